"""Bitwise determinism across processes and intra-op thread counts.

XLA:CPU sizes its intra-op thread pool (the ffi::ThreadPool the kernel
schedules its tasks on) from the process's CPU affinity, so a child process
pinned to one CPU gets a one-thread pool and an unpinned one gets one thread
per CPU. The same convolutions, forward and both gradients, must give the
same bits in both: every output element is computed by one task with a fixed
reduction order, whichever thread runs it.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# Runs in a fresh process: pins itself (before jax creates its pool), runs the
# cases, saves every output as .npy and reports the pool's thread count.
CHILD = textwrap.dedent("""
    import json, os, sys
    out_dir, cpus = sys.argv[1], json.loads(sys.argv[2])
    os.sched_setaffinity(0, cpus)
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import cks_jax

    # Several row blocks (kMC = 96 rows per task), several sub-problems
    # (strides, lhs and rhs dilation), groups, a reduction over several kKC blocks.
    CASES = {
        "plain": ((4, 32, 20, 20), (24, 32, 3, 3), dict(window_strides=(1, 1), padding="SAME")),
        "transposed": ((3, 16, 11, 13), (12, 16, 4, 4),
                       dict(window_strides=(1, 1), padding=((2, 2), (3, 1)), lhs_dilation=(2, 2))),
        "strided_dilated": ((2, 24, 30, 17), (16, 24, 3, 2),
                            dict(window_strides=(2, 1), padding=((2, 2), (1, 1)),
                                 rhs_dilation=(2, 3))),
        "groups": ((2, 24, 16, 16), (24, 8, 3, 3),
                   dict(window_strides=(1, 1), padding="SAME", feature_group_count=3)),
        "long_reduction": ((2, 300, 12, 12), (40, 300, 3, 3),
                           dict(window_strides=(1, 1), padding="SAME")),
        # kernel == stride: the forward runs its phases as task units, the
        # filter gradient (one sub-problem per tap) does not.
        "kernel_equals_stride": ((2, 16, 24, 24), (8, 16, 2, 2),
                                 dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                      lhs_dilation=(2, 2))),
        "3d": ((2, 8, 9, 8, 7), (8, 8, 3, 3, 2),
               dict(window_strides=(1, 2, 1), padding="SAME", rhs_dilation=(1, 1, 2))),
        # NHWC, 3 features: the forward runs on the dot path (tasks of 4 x 96 rows), the
        # filter gradient on the narrow path
        "narrow_nhwc": ((4, 14, 14, 40), (4, 4, 40, 3),
                        dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2),
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))),
        # NHWC, 64 channels and 40 features: bfloat16's forward and input gradient run on the
        # pair path where the CPU has AVX512_BF16 (5 row blocks per phase)
        "pairs_nhwc": ((3, 12, 12, 64), (4, 4, 64, 40),
                       dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2),
                            dimension_numbers=("NHWC", "HWIO", "NHWC"))),
        # NHWC, 4 groups, k4 s2 transposed: forward and input gradient run each row block's
        # groups in turn as one unit (groups_unit), the filter gradient on the narrow path
        "groups_nhwc": ((4, 12, 12, 64), (4, 4, 16, 32),
                        dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2),
                             feature_group_count=4, dimension_numbers=("NHWC", "HWIO", "NHWC"))),
        # NHWC depthwise (40 groups): all three on the depthwise path, whose lane blocks are
        # split among the workers (not its rows: 4 per chain, the tail 1 in 4 chains)
        "depthwise_nhwc": ((2, 13, 12, 40), (3, 3, 1, 40),
                           dict(window_strides=(1, 1), padding="SAME", feature_group_count=40,
                                dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    }
    for dtype in (np.float32, np.float64, jnp.bfloat16):
      for name, (ls, rs, kw) in CASES.items():
        rng = np.random.default_rng(0)
        l = jnp.asarray(rng.standard_normal(ls), dtype)
        r = jnp.asarray(rng.standard_normal(rs), dtype)
        f = lambda l, r: cks_jax.conv_general_dilated(l, r, **kw, backend="ffi")
        shape = jax.eval_shape(f, l, r).shape
        ct = jnp.asarray(rng.standard_normal(shape), dtype)
        val_and_vjp = jax.jit(lambda l, r, ct: (lambda o, vjp: (o,) + vjp(ct))(*jax.vjp(f, l, r)))
        res = dict(zip(("out", "d_lhs", "d_rhs"), val_and_vjp(l, r, ct)))
        for what, x in res.items():
          x = np.asarray(x)  # saved as raw bits (np.save has no bfloat16)
          np.save(os.path.join(out_dir, f"{name}-{np.dtype(dtype).name}-{what}.npy"),
                  x.view(f"u{x.itemsize}"))
    names = [open(f"/proc/self/task/{t}/comm").read().strip()
             for t in os.listdir("/proc/self/task")]
    json.dump({"pool_threads": sum("Eigen" in n for n in names)},
              open(os.path.join(out_dir, "threads.json"), "w"))
""")


def _run(tmp_path: pathlib.Path, label: str, cpus: list[int]) -> tuple[int, dict[str, bytes]]:
  out = tmp_path / label
  out.mkdir()
  subprocess.run([sys.executable, "-c", CHILD, str(out), json.dumps(cpus)], check=True,
                 cwd=tmp_path, timeout=300)
  threads = json.loads((out / "threads.json").read_text())["pool_threads"]
  return threads, {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not pathlib.Path("/proc/self/task")
                    .exists(), reason="needs Linux CPU affinity and /proc to vary the pool")
def test_bitwise_identical_across_processes_and_thread_counts(tmp_path):
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < 2:
    pytest.skip("one CPU available: cannot run with two different pool sizes")
  one_t, one = _run(tmp_path, "one_cpu", cpus[:1])
  all_t, every = _run(tmp_path, "all_cpus", cpus)
  # The knob really changed the pool the kernel runs on.
  assert one_t == 1 and all_t == len(cpus), (one_t, all_t)
  assert len(one) == 11 * 3 * 3 and one.keys() == every.keys()
  differ = [k for k in one if one[k] != every[k]]
  assert not differ, f"outputs differ between 1 and {len(cpus)} threads: {differ}"
  # Sanity: the cases computed something.
  assert all(np.load(tmp_path / "one_cpu" / k).any() for k in one)
