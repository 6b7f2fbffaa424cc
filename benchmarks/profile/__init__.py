"""The static GPU profile (``python -m bitlaw.benchmarks.profile``): what the code launches (``variants``), compiling
it for a GPU target on the CPU and reading its SASS (``sass``), the layer and block estimate built on it
(``estimate``), and the command with its tables and records (``__main__``)."""
