"""Research tools, each a module with ``main()`` (``python -m nnunetv2_mobilevim.research.NAME --help``):
training comparisons inside nnU-Net, synthetic datasets, where an epoch's time goes, loader
throughput, a profile of nnU-Net's training step, the first-call cost of a fresh process, the wall time of
whole prediction commands."""
