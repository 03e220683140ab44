"""The cks-jax command line: explain, bench and train, end to end on tiny settings."""
import json
import re

import numpy as np
import pytest

from cks_jax import cli


def test_explain(capsys):
  assert cli.main(["explain", "--lhs", "2,8,8,4", "--rhs", "4,4,4,3", "--padding", "2,2,2,2",
                   "--lhs-dilation", "2,2", "--dimension-numbers", "NHWC,HWIO,NHWC"]) == 0
  out = capsys.readouterr().out
  assert "KS-deconv on cks-cpu" in out and "d rhs" in out


@pytest.mark.parametrize("argv, message", [
    (["--lhs", "2,8,8,a", "--rhs", "4,4,4,3"], "'2,8,8,a' is not a list of integers"),
    (["--lhs", "2,8,8,4", "--rhs", "4,4,4,3", "--padding", "1,1,1"], "lo,hi pairs"),
    (["--lhs", "2,8,8,4", "--rhs", "4,4,4,3", "--dimension-numbers", "NHWC,HWIO"],
     "three specs"),
    # The layer's own errors, worded as lax words them: channels that do not match, a zero stride.
    (["--lhs", "2,8,8,4", "--rhs", "4,4,5,3", "--dimension-numbers", "NHWC,HWIO,NHWC"],
     "feature_group_count must equal the rhs input feature dimension size"),
    (["--lhs", "2,8,8,4", "--rhs", "4,4,4,3", "--strides", "0,1",
      "--dimension-numbers", "NHWC,HWIO,NHWC"], "window_strides"),
])
def test_explain_bad_input_is_a_usage_error(argv, message, capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(["explain"] + argv)
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert "cks-jax explain: error:" in err and message in err
  assert "Traceback" not in err


def test_explain_error_names_the_default_layout(capsys):
  # Channels-last shapes without --dimension-numbers are read as NCHW: the error says so.
  with pytest.raises(SystemExit):
    cli.main(["explain", "--lhs", "8,64,64,64", "--rhs", "2,2,64,32"])
  assert "--dimension-numbers NHWC,HWIO,NHWC" in capsys.readouterr().err


def test_bench_json_and_table(tmp_path, capsys):
  path = tmp_path / "b.json"
  assert cli.main(["bench", "--layers", "^wavenet_1d_d1$", "--repeats", "1", "--no-torch",
                   "--json", str(path)]) == 0
  out = capsys.readouterr().out
  assert "wavenet_1d_d1" in out and "vs xla" in out
  rows = json.loads(path.read_text())["rows"]
  assert [r["op"] for r in rows] == ["fwd", "dlhs", "drhs"]
  assert all(r["cks_ms"] > 0 and r["xla_ms"] > 0 and r["gflop"] > 0 for r in rows)


def test_bench_load_reprints_a_saved_run(tmp_path, capsys):
  path = tmp_path / "b.json"
  assert cli.main(["bench", "--layers", "^wavenet_1d_d1$", "--repeats", "1", "--no-torch",
                   "--no-portable", "--json", str(path)]) == 0
  timed = capsys.readouterr().out.splitlines()
  assert cli.main(["bench", "--load", str(path)]) == 0
  loaded = capsys.readouterr().out.splitlines()
  assert loaded == timed[:-1]  # all but "wrote b.json"
  assert any(re.match(r"Sk-dilated, atrous convs \(1\) +drhs +\d", l) for l in loaded)
  assert cli.main(["bench", "--load", str(path), "--json", str(tmp_path / "c.json")]) == 2
  for bad in ("{}", '{"machine": {}, "rows": []}', "not json"):
    (tmp_path / "bad.json").write_text(bad)
    assert cli.main(["bench", "--load", str(tmp_path / "bad.json")]) == 2
    assert "not a results file" in capsys.readouterr().err


def test_bench_summary_per_family_and_slower_ops():
  from cks_jax._src import bench
  row = lambda layer, fam, op, cks, xla, torch: bench.Row(layer, fam, op, 1.0, cks, xla, torch)
  report = bench.Report(machine={}, rows=[
      row("a", "ks_deconv", "fwd", 1.0, 4.0, 2.0),   # 4x XLA, 2x torch
      row("b", "ks_deconv", "fwd", 1.0, 1.0, 8.0),   # 1x XLA, 8x torch
      row("c", "sk_dilated", "drhs", 2.0, 3.0, 1.0),  # slower than torch: 0.5x
      row("d", "convv2", "dlhs", 1.0, 0.9, None),     # slower than XLA, no torch: 0.9x
  ])
  lines = bench.summarize(report)
  fwd = next(l for l in lines if re.match(r"KS-deconv, transposed convs \(2\) +fwd ", l))
  assert "2.00x (1.00-4.00x)" in fwd and "4.00x (2.00-8.00x)" in fwd
  assert lines[-1] == ("ops slower than the faster of XLA and PyTorch: 2 of 4: "
                       "c drhs 0.50x, d dlhs 0.90x")
  # With the rounds kept, each slower op says in how many of them cks-jax was ahead of the
  # faster of the two (here PyTorch for "c", by its median; XLA for "d", which has no PyTorch).
  report.rows[2].cks_rounds, report.rows[2].torch_rounds = [2.0, 1.0, 2.2], [1.0, 1.1, 0.9]
  report.rows[2].xla_rounds = [0.5, 0.5, 0.5]  # not the faster by its median: not compared
  report.rows[3].cks_rounds, report.rows[3].xla_rounds = [1.0, 0.8], [0.9, 0.9]
  assert bench.summarize(report)[-1] == (
      "ops slower than the faster of XLA and PyTorch: 2 of 4: "
      "c drhs 0.50x (ahead in 1 of 3 rounds), d dlhs 0.90x (ahead in 1 of 2 rounds)")


def test_bench_counts_page_faults_per_call():
  pytest.importorskip("resource", reason="page faults are read with getrusage (POSIX)")
  import mmap
  from cks_jax._src import bench

  def fresh():  # touches 256 new pages every call
    m = mmap.mmap(-1, 256 * mmap.PAGESIZE)
    m[::mmap.PAGESIZE] = b"\1" * 256
    m.close()

  faults = {}
  bench.time_interleaved({"fresh": fresh, "idle": lambda: None}, 3, 1.0, faults)
  assert faults["fresh"] >= 256 and faults["idle"] < 16, faults
  report = bench.Report(machine={}, rows=[
      bench.Row("a", "ks_deconv", "fwd", 1.0, 1.0, 2.0, cks_faults=faults["fresh"], xla_faults=0),
      bench.Row("b", "ks_deconv", "fwd", 1.0, 1.0, 2.0, cks_faults=faults["idle"])])
  line = next(l for l in bench.summarize(report) if "page faults" in l)
  assert f"a fwd {faults['fresh']:.0f} (0)" in line and "b fwd" not in line


def test_bench_bfloat16(tmp_path, capsys):
  path = tmp_path / "b.json"
  assert cli.main(["bench", "--layers", "^wavenet_1d_d1$", "--repeats", "1", "--no-torch",
                   "--no-portable", "--dtype", "bfloat16", "--json", str(path)]) == 0
  assert "bfloat16 operands" in capsys.readouterr().out
  report = json.loads(path.read_text())
  assert report["machine"]["dtype"] == "bfloat16"
  assert all(r["cks_ms"] > 0 and r["xla_ms"] > 0 for r in report["rows"])


def test_bench_rejects_unknown_layer(capsys):
  assert cli.main(["bench", "--layers", "no-such-layer"]) == 2


def test_train_converges_like_lax(tmp_path, capsys):
  pytest.importorskip("sklearn", reason="train uses scikit-learn's bundled digits")
  pytest.importorskip("matplotlib", reason="train writes a PNG")
  js, png = tmp_path / "t.json", tmp_path / "t.png"
  assert cli.main(["train", "--steps", "40", "--json", str(js), "--plot", str(png)]) == 0
  res = json.loads(js.read_text())
  cks, ref = res["cks"]["losses"]["dilated"], res["lax"]["losses"]["dilated"]
  # Same seeds and batches: the classifier's curves agree to rounding noise,
  # and it learns.
  np.testing.assert_allclose(cks[:20], ref[:20], rtol=1e-3)
  assert np.mean(cks[-5:]) < np.mean(cks[:5])
  assert png.stat().st_size > 10_000


def test_bench_times_backends_in_rounds_of_blocks(monkeypatch):
  # Every backend of an op (PyTorch too) runs a block of back-to-back calls per round, in turn,
  # so each is timed with its own operands in the caches and a change in machine load moves the
  # columns together: an untimed call, then timed ones for BLOCK_S, so at least one even where
  # a call is longer than BLOCK_S; a call of ALONE_S or more is its own block. At least
  # `repeats` timed calls each.
  import itertools
  import time
  from cks_jax._src import bench
  monkeypatch.setattr(bench, "ALONE_S", 0.08)  # 50 ms above xla's nap: a loaded CI oversleeps
  calls = []
  naps = {"cks": 0.002, "xla": bench.BLOCK_S * 1.5, "portable": 0.004, "torch": 0.1}

  spans = []  # (start, end) of each call, in calls' order

  def fn(k):
    def f():
      calls.append(k)
      t0 = time.perf_counter()
      time.sleep(naps[k])
      spans.append((t0, time.perf_counter()))
    return f

  rounds = {}
  ms = bench.time_interleaved({k: fn(k) for k in naps}, repeats=4, budget_s=10.0,
                              rounds=rounds)
  assert set(ms) == set(naps) == set(rounds)
  for k, nap in naps.items():
    assert nap <= ms[k] * 1e-3 < nap + 0.05, (k, ms[k])
  assert calls[:4] == list(naps)  # one warm-up call each
  blocks = [(k, len(list(g))) for k, g in itertools.groupby(calls[4:])]
  assert len(blocks) >= 4 * 4 and len(blocks) % 4 == 0
  assert [k for k, _ in blocks] == list(naps) * (len(blocks) // 4)  # rounds, in turn
  for k, nap in naps.items():  # each block's median, round by round
    assert len(rounds[k]) == len(blocks) // 4, (k, rounds[k])
    assert all(nap <= t * 1e-3 < nap + 0.05 for t in rounds[k]), (k, rounds[k])
  i = 4  # the first call of each block in calls and spans
  for k, n in blocks:
    if k == "torch":
      assert n == 1  # slower than ALONE_S: timed on its own
    elif k == "xla":
      assert n == 2  # slower than a block: the untimed call and one timed
    else:  # the untimed call, then timed ones until BLOCK_S has passed since the block began
      # (the calls' own clocks, which start after and stop before the bench's: 1 ms of slack;
      # a loaded machine oversleeps the naps, so the count of calls is not fixed)
      assert n >= 2, (k, n)
      start = spans[i][0]
      assert spans[i + n - 1][1] - start >= bench.BLOCK_S - 1e-3, (k, n)
      assert spans[i + n - 2][1] - start < bench.BLOCK_S + 1e-3, (k, n)
    i += n


def test_bench_min_time_sets_the_timed_seconds(capsys):
  # --min-time: GPU kernels of microseconds need far less than the CPU's 0.3 s per backend.
  import time
  from cks_jax._src import bench
  fns = {"a": lambda: time.sleep(0.001), "b": lambda: time.sleep(0.001)}
  for min_time, lo, hi in [(0.0, 0.0, 0.2), (0.25, 0.5, 2.0)]:  # seconds per function
    t0 = time.perf_counter()
    bench.time_interleaved(fns, repeats=2, budget_s=10.0, min_time_s=min_time)
    assert lo <= time.perf_counter() - t0 < hi, min_time
  assert cli.main(["bench", "--layers", "^wavenet_1d_d1$", "--min-time", "-1"]) == 2
  assert "--min-time must be >= 0" in capsys.readouterr().err


def test_pipelined_blocks_time_a_device_not_the_dispatch(monkeypatch):
  # A fake device: each call costs the host 1 ms to issue and queues 4 ms of work, done in order.
  # Waiting after every call times both (5 ms); pipelined blocks time the device (4 ms), as a
  # training loop sees it, and still wait for all of it (sync is called at each wait). Blocks of
  # 100 ms: a block holds at least 3 calls even where a loaded machine stretches the 5 ms call
  # 6-fold (CI, with 20 ms blocks, once fit 2).
  import time
  from cks_jax._src import bench
  monkeypatch.setattr(bench, "BLOCK_S", 0.1)
  state = {"free_at": 0.0, "syncs": 0, "calls": 0}

  class Pending:
    def __init__(self, done_at):
      self.done_at = done_at

    def block_until_ready(self):
      time.sleep(max(0.0, self.done_at - time.perf_counter()))
      return self

  def call():
    time.sleep(0.001)  # dispatch
    state["free_at"] = max(state["free_at"], time.perf_counter()) + 0.004
    state["calls"] += 1
    return Pending(state["free_at"])

  def sync():
    state["syncs"] += 1
    time.sleep(max(0.0, state["free_at"] - time.perf_counter()))

  blocking = bench.time_interleaved({"f": call}, 8, 10.0, min_time_s=0.1)["f"]
  assert 4.9 <= blocking < 6.5, blocking
  state["calls"] = 0
  ms = bench.time_interleaved({"f": call}, 8, 10.0, min_time_s=0.1, pipelined=True,
                              sync=sync)["f"]
  assert 3.9 <= ms < 4.8, ms  # 4 ms + the first dispatch per block; under the 5 ms above
  # Waits: the warm-up call's, then per block the untimed call's and the block's one. A block
  # holds as many calls as the untimed call's ~5 ms fit in BLOCK_S (100 ms): up to 20.
  blocks, rest = divmod(state["syncs"] - 1, 2)
  assert rest == 0 and blocks >= 8
  assert 3 * blocks <= state["calls"] - 1 - blocks <= 20 * blocks, (state, blocks)


def test_demo_runs_its_three_parts(tmp_path, monkeypatch, capsys):
  # The README's main job (explain, the quick bench, a short training run), here on one layer
  # and 2 training steps; its bench arguments once lacked an option cmd_bench read.
  from cks_jax._src import bench
  monkeypatch.setattr(cli, "QUICK_LAYERS", ("wavenet_1d_d1",))
  monkeypatch.setattr(bench, "MIN_TIMED_S", 0.01)
  monkeypatch.chdir(tmp_path)
  assert cli.main(["demo", "--no-torch", "--steps", "2"]) == 0
  out = capsys.readouterr().out
  assert "KS-deconv" in out and "wavenet_1d_d1" in out
  for name in ("cks_bench.json", "cks_bench.png", "cks_train.json", "cks_train.png"):
    assert (tmp_path / name).stat().st_size > 0, name
