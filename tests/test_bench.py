"""The benchmark runs end to end on a tiny model and reports what it claims."""
import numpy as np

from stepnet_jax import bench


def test_bench_runs_and_counts_only_each_levels_work():
  r = bench.run('lenet3c1l', num_levels=3, batch=4, train_batch=4, width=0.25, repeats=1)
  assert len(r['stepping']['step_ms']) == 3
  assert np.isclose(r['stepping']['sum_steps_ms'], sum(r['stepping']['step_ms']))
  fastest = min(r['stepping']['masked_forward_ms'], r['stepping']['blocked_forward_ms'])
  assert np.isclose(r['stepping']['ratio'], r['stepping']['sum_steps_ms'] / fastest)
  # Each compiled step's FLOPs are at least its own level's multiply-adds and not much more.
  assert all(0.99 < x < 1.5 for x in r['flops']['ratio']), r['flops']['ratio']
  assert r['flops']['masked_top_forward_ratio_to_kept'] > 1.0  # the masked forward computes the zeros
  assert len(r['conv_layer']['block_ms']) == 3
  report = bench.format_report(r)
  assert all(f'L{k} ' in report for k in range(3)) and '(d) conv2' in report
