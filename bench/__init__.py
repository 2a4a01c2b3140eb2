"""Benchmarks of mpd_triton's fused LIF kernels against their peers.

    python -m bench.kernels [--quick]          # kernel-level sweep (forward, backward, both; statistics off/on)
    python -m bench.kernels --model vgg11      # one VGG11 training step with MPD-SGR (bench.model_step)

Modules: ``measure`` (byte model, timers, peak memory, copy ceiling),
``providers`` (what is timed), ``peers`` (SpikingJelly, as its user would
call it), ``report`` (table, JSON, markdown, plots), ``kernels`` and
``model_step`` (the two command lines). See docs/benchmarks.md.
"""
