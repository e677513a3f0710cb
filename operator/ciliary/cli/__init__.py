"""The ``ciliary`` command line: lab, policy, observe."""
