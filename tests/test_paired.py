"""The paired statistics of a comparison's leads, against independent computations: scipy's
binomial test, a bootstrap that resamples image indices, and counts taken by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from stepnet_jax.config import SettingsError
from stepnet_jax.studies import paired


@pytest.mark.parametrize('wins,losses', [(0, 0), (0, 5), (5, 0), (7, 3), (3, 7), (50, 80), (371, 373), (1200, 1000)])
def test_mcnemar_is_the_exact_two_sided_binomial_test(wins, losses):
  expected = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5).pvalue
  assert paired.mcnemar_p(wins, losses) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_paired_lead_matches_resampling_the_images():
  rng = np.random.default_rng(1)
  n = 500
  first = rng.random(n) < 0.9
  second = np.where(rng.random(n) < 0.8, first, rng.random(n) < 0.88)  # correlated, as two networks are
  out = paired.paired_lead(first, second, draws=20_000, seed=3)
  wins = sum(1 for a, b in zip(first, second) if a and not b)
  losses = sum(1 for a, b in zip(first, second) if b and not a)
  assert (out['wins'], out['losses'], out['images']) == (wins, losses, n)
  assert out['lead'] == pytest.approx(100 * (first.mean() - second.mean()))
  # The bootstrap as usually written: resample image indices, recompute both accuracies.
  idx = rng.integers(0, n, size=(4000, n))
  boot = 100 * (first[idx].mean(1) - second[idx].mean(1))
  expected = np.quantile(boot, [0.025, 0.975])
  np.testing.assert_allclose(out['interval'], expected, atol=0.4)  # one image is 0.2 point here
  assert out['interval'][0] < out['lead'] < out['interval'][1]
  assert out['p_mcnemar'] == pytest.approx(stats.binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-9)
  # Two identical networks: no lead, no spread.
  same = paired.paired_lead(first, first)
  assert (same['lead'], same['interval'], same['p_mcnemar']) == (0.0, [0.0, 0.0], 1.0)


def test_paired_lead_refuses_what_is_not_two_hit_vectors():
  with pytest.raises(ValueError, match='equal, non-empty'):
    paired.paired_lead(np.ones(3, bool), np.ones(4, bool))
  with pytest.raises(ValueError, match='equal, non-empty'):
    paired.paired_lead(np.ones(0, bool), np.ones(0, bool))
  with pytest.raises(ValueError, match='confidence'):
    paired.paired_lead(np.ones(3, bool), np.ones(3, bool), confidence=1.0)


def _results(hits: dict[str, np.ndarray], macs: dict[str, list[int]], reusable: dict[str, bool]) -> dict:
  out = {}
  for name, h in hits.items():
    reach = np.asarray(macs[name]) if reusable[name] else np.cumsum(macs[name])
    out[name] = {
      'levels': [
        {'level': k, 'macs': m, 'macs_to_reach': int(r), 'accuracy': float(h[k].mean())}
        for k, (m, r) in enumerate(zip(macs[name], reach))
      ]
    }
  return out


def test_paired_leads_pair_the_levels_the_report_compares():
  rng = np.random.default_rng(0)
  n = 40
  hits = {name: rng.random((2, n)) < p for name, p in (('steppingnet', 0.8), ('awn', 0.7), ('slimmable', 0.75))}
  hits['slimmable'][1] = np.arange(n) >= 2  # the best peer level of all, but 440 MACs to reach
  macs = {'steppingnet': [100, 400], 'awn': [100, 400], 'slimmable': [90, 350]}
  reusable = {'steppingnet': True, 'awn': True, 'slimmable': False}
  results = _results(hits, macs, reusable)
  paired.check_hits(results, hits)
  rows = paired.paired_leads(results, hits, draws=500)
  assert set(rows) == {'macs', 'macs_to_reach'}
  acc = {name: h.mean(1) for name, h in hits.items()}
  for reading, rs in rows.items():
    for r in rs:
      k = r['awn_level']  # SteppingNet's level k sits at AWN's point k here
      budget = macs['awn'][k]
      # By hand: the best peer level within the budget on this reading (slimmable recomputes).
      fits = [
        (acc[name][j], name, j)
        for name in ('awn', 'slimmable')
        for j, row in enumerate(results[name]['levels'])
        if row[reading] <= budget
      ]
      best_acc, peer, level = max(fits)
      assert (r['steppingnet_level'], r['best_peer'], r['best_peer_level']) == (k, peer, level)
      mine, theirs = hits['steppingnet'][k], hits[peer][level]
      assert (r['wins'], r['losses']) == (int((mine & ~theirs).sum()), int((theirs & ~mine).sum()))
      assert r['lead'] == pytest.approx(100 * (acc['steppingnet'][k] - best_acc))
  assert (rows['macs'][1]['best_peer'], rows['macs'][1]['best_peer_level']) == ('slimmable', 1)
  assert (rows['macs_to_reach'][1]['best_peer'], rows['macs_to_reach'][1]['best_peer_level']) != ('slimmable', 1)
  table = paired.format_markdown(rows)
  assert table.count('\n| subnet MACs |') == 2 and table.count('\n| MACs to reach |') == 2
  # Hits that do not give the recorded accuracies (other networks or images) are refused.
  results['awn']['levels'][1]['accuracy'] += 1 / n
  with pytest.raises(SettingsError, match='awn: the test accuracy evaluated again'):
    paired.check_hits(results, hits)


def test_the_study_refuses_what_it_cannot_pair(tmp_path):
  with pytest.raises(SettingsError, match='no such file'):
    paired.paired_study(str(tmp_path))
  (tmp_path / 'compare.json').write_text('{"seeds": [0, 1], "methods": {}}')
  with pytest.raises(SettingsError, match="one seed's comparison"):
    paired.paired_study(str(tmp_path))
  (tmp_path / 'compare.json').write_text('{"methods": {"steppingnet": {"levels": []}, "awn": {"levels": []}}}')
  with pytest.raises(SettingsError, match='no run directory for steppingnet, awn'):  # e.g. taken from a ledger
    paired.paired_study(str(tmp_path))
