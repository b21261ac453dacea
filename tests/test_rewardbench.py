"""RewardBench aggregation: strict '>' per example, count-weighted sections, unweighted mean of sections."""
import pytest

from jalign import rewardbench


def test_ties_are_wrong_and_subsets_are_separate():
  rep = rewardbench.report(["a", "a", "a", "b"], [1.0, 0.5, 2.0, 0.0], [0.0, 0.5, 3.0, -1.0])
  assert rep["subsets"] == {"a": {"accuracy": 1 / 3, "n": 3}, "b": {"accuracy": 1.0, "n": 1}}
  assert rep["accuracy"] == 0.5 and rep["n"] == 4
  assert rep["sections"] == {} and rep["score"] is None  # not RewardBench subsets


def test_sections_weighted_by_rewardbench_counts():
  acc = {"alpacaeval-easy": 1.0, "mt-bench-easy": 0.5,            # Chat: counts 100 and 28
         "math-prm": 0.5, "hep-python": 1.0, "hep-go": 0.0,          # Reasoning: 984 (upweighted) and 164 each
         "donotanswer": 0.25}                                        # Safety
  s = rewardbench.section_scores(acc)
  assert s["Chat"] == pytest.approx((100 * 1.0 + 28 * 0.5) / 128)
  assert s["Reasoning"] == pytest.approx((984 * 0.5 + 164 * 1.0 + 164 * 0.0) / (984 + 164 + 164))
  assert s["Safety"] == pytest.approx(0.25)
  assert "Chat Hard" not in s
  subsets, chosen, rejected = [], [], []
  for name, a in acc.items():  # 4 examples per subset with the given accuracy
    k = int(a * 4)
    subsets += [name] * 4
    chosen += [1.0] * 4
    rejected += [0.0] * k + [2.0] * (4 - k)
  rep = rewardbench.report(subsets, chosen, rejected)
  assert rep["sections"] == pytest.approx(s)
  assert rep["score"] == pytest.approx(sum(s.values()) / 3)
  text = rewardbench.format_report(rep)
  assert "section Reasoning" in text and "RewardBench score" in text


def test_mapping_covers_all_counted_subsets():
  mapped = [s for v in rewardbench.SUBSET_MAPPING.values() for s in v]
  assert sorted(mapped) == sorted(rewardbench.EXAMPLE_COUNTS)
  assert sum(rewardbench.EXAMPLE_COUNTS[s] for s in rewardbench.SUBSET_MAPPING["Chat"]) == 358
  assert sum(rewardbench.EXAMPLE_COUNTS[s] for s in rewardbench.SUBSET_MAPPING["Chat Hard"]) == 456
  assert sum(rewardbench.EXAMPLE_COUNTS[s] for s in rewardbench.SUBSET_MAPPING["Safety"]) == 740
