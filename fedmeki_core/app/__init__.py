"""The researcher's application: the `fedmeki` command line, the demo, the bench launcher, provisioning, reports.

It imports the shared core; the core, the coordinator and the silo agent never import it (import-linter contract).
"""
