"""Nightly RNN/LSTM/GRU forecasting: the package that does the work (flows/ only orchestrates)."""

import os

# torch's OpenMP threads sleep as soon as they wait, rather than spinning for ~3 ms first
# (libgomp's default). Where another process wants the same cores - the other dataset's night,
# a `predict`, a test run - the spinning threads took the time the working ones needed: two
# GRU fits at once on 2 cores took 4.8x as long each as one alone (3.5x to 8.7x); sleeping,
# 1.15x. One fit alone takes up to 1.1x as long sleeping (benchmarks/concurrent_nights.py,
# 2026-12-07). libgomp reads it once, when torch loads it, so it is set here, before any module
# of this package imports torch. A value the user set is kept; GOMP_SPINCOUNT=300000 restores
# libgomp's default spin (OMP_WAIT_POLICY=ACTIVE spins for minutes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
