"""Plain-PyTorch ports of the official per-iteration loops of DATM (with TESLA), DANCE and RCIG: the baseline
that ``benchmarks/bench_e2e.py`` times ddfast's distillers against. Each port shares nothing with ddfast's
distillers but the data, the expert / pool parameters and the augmentation; ``bench_e2e.py`` checks that both
compute the same losses and gradients before timing."""
