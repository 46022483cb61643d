"""common/rewards.py and common/rollout.py: the one fallback rule, the weight check, every check on what a reward
source returns, per-source metrics, the constant-reward warning, and the generation metrics' reduction over
processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common import rewards, rollout


def _fn(values, name="my_reward"):
    def f(prompts, completions, **kw):
        return values

    f.__name__ = name
    return f


def _sources(*funcs, weights=None):
    """RewardSources over in-memory functions (the loading path is tested separately)."""
    rs = rewards.RewardSources.__new__(rewards.RewardSources)
    rs.specs = [f.__name__ for f in funcs]
    rs.weights = rewards.check_weights(rs.specs, weights)
    rs.funcs = list(funcs)
    rs.names = [f.__name__ for f in funcs]
    rs._checked = False
    return rs


# ----------------------------------------------------------------------------- which sources
def test_default_specs_one_rule():
    assert rewards.default_specs(None, None, "toy:add") == ["add"]
    assert rewards.default_specs([], None, "toy:reverse:conversational") == ["reverse"]
    assert rewards.default_specs(None, "toy-rm", "toy:add") == ["model:toy-rm"]  # a reward model replaces the default
    assert rewards.default_specs(["f.py:a", "add"], "rm", "data.jsonl") == ["f.py:a", "add", "model:rm"]
    assert rewards.default_specs("f.py:a", None, "data.jsonl") == ["f.py:a"]
    with pytest.raises(ValueError, match="--reward_funcs.*--reward_model_name_or_path"):
        rewards.default_specs(None, None, "my_prompts.jsonl")  # never a silent toy reward on user data


def test_weights_checked_before_anything_loads():
    # the second spec does not exist: the weight error must come first (nothing was loaded)
    with pytest.raises(ValueError, match=r"--reward_weights has 1 values but there are 2 reward sources"):
        rewards.RewardSources(["add", "missing_file.py:f"], [1.0], "toy:add")
    with pytest.raises(ValueError, match="finite"):
        rewards.check_weights(["add"], [float("nan")])
    assert rewards.check_weights(["a", "b"], None).tolist() == [1.0, 1.0]


def test_loaded_sources_and_unique_names():
    rs = rewards.RewardSources(["add", "add"], [1.0, 0.5], "toy:add")
    assert rs.names == ["add_exact_1", "add_exact_2"] and rs.weights.tolist() == [1.0, 0.5]
    out = rs(["1+1=", "1+1="], ["2", "3"], [[1], [2]])
    assert out.tolist() == [[1.0, 1.0], [0.0, 0.0]]


# ----------------------------------------------------------------------------- what a source may return
def test_none_is_nan_and_arrays_are_accepted():
    rs = _sources(_fn([None, 1, True]), _fn(np.array([0.5, 1.5, 2.5]), "arr"), _fn(torch.tensor([1.0, 2.0, 3.0]), "t"))
    out = rs(["p"] * 3, ["a", "b", "c"], [[]] * 3)
    assert math.isnan(out[0, 0]) and out[1:, 0].tolist() == [1.0, 1.0]
    assert out[:, 1].tolist() == [0.5, 1.5, 2.5] and out[:, 2].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_names_the_function_and_a_sample(bad):
    rs = _sources(_fn([1.0, bad], "accuracy"))
    with pytest.raises(rewards.RewardError) as e:
        rs(["1+1=", "2+2=" + "x" * 1000], ["2", "five"], [[], []])
    msg = str(e.value)
    assert "reward function 'accuracy'" in msg and str(bad) in msg and "sample 1" in msg and "'five'" in msg
    assert "characters)" in msg and len(msg) < 1000  # the long prompt is truncated


def test_string_reward_names_the_function_and_the_type():
    rs = _sources(_fn(["1", "0"], "exact_match"))
    with pytest.raises(rewards.RewardError, match=r"reward function 'exact_match' returned a value of type str"):
        rs(["p", "q"], ["a", "b"], [[], []])


@pytest.mark.parametrize("out,match", [([1.0], "returned 1 values for 2 samples"), (1.0, "returned a float"),
                                       ("ab", "returned a str")])
def test_wrong_length_or_shape_names_the_function(out, match):
    with pytest.raises(rewards.RewardError, match=f"reward function 'fmt'.*{match}"):
        _sources(_fn(out, "fmt"))(["p", "q"], ["a", "b"], [[], []])


def test_reward_model_non_finite_is_named_as_a_model():
    class BrokenModel(rewards.RewardModel):
        def __init__(self):
            self.__name__ = "my-rm"

        def __call__(self, prompts, completions, **kw):
            return [float("nan")] * len(prompts)

    with pytest.raises(rewards.RewardError, match="reward model 'my-rm' returned nan for sample 0"):
        rewards.score([BrokenModel()], ["p"], ["a"], [[]])


def test_judge_scores_are_checked_too():
    from common.judges import RewardJudge, check_probabilities

    with pytest.raises(rewards.RewardError, match="'inf_reward' returned inf"):
        RewardJudge(_fn([float("inf")] * 2, "inf_reward")).judge(["p"], [("a", "b")])
    with pytest.raises(ValueError, match="finite probabilities"):
        check_probabilities([0.5, float("nan")], 2, "judge")


# ----------------------------------------------------------------------------- metrics and the constant warning
def test_metrics_by_hand_nan_aware():
    rs = _sources(_fn(None, "a"), _fn(None, "b"))
    rpf = torch.tensor([[1.0, float("nan")], [3.0, float("nan")], [float("nan"), 2.0]])
    m = rs.metrics(rpf)
    assert m["rewards/a/mean"] == 2.0 and m["rewards/a/std"] == pytest.approx(math.sqrt(2))  # Bessel
    assert m["rewards/b/mean"] == 2.0 and m["rewards/b/std"] == 0.0


def test_constant_rewards_warn_once_naming_the_sources(capsys):
    rs = _sources(_fn(None, "exact"), _fn(None, "fmt"))
    r = torch.tensor([[0.0, float("nan")], [0.0, float("nan")], [0.0, float("nan")]])
    msg = rs.check_varies([r[:2], r[2:]])
    err = capsys.readouterr().err
    assert msg and "WARNING" in err and "exact" in err and "fmt" in err and "scored no sample" in err
    assert "gave 0 to every scored sample" in err and "answer column" in err
    assert rs.check_varies(r) is None and capsys.readouterr().err == ""  # only once


def test_no_warning_when_any_reward_varies(capsys):
    rs = _sources(_fn(None, "exact"), _fn(None, "fmt"))
    assert rs.check_varies(torch.tensor([[0.0, 1.0], [0.0, 0.0]])) is None
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- rollout metrics
def test_completion_metrics_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    m = rollout.completion_metrics(None, mask, torch.tensor([True, False, True]))
    assert m["completions/mean_length"] == pytest.approx(8 / 3)
    assert (m["completions/min_length"], m["completions/max_length"]) == (1.0, 4.0)
    assert m["completions/clipped_ratio"] == pytest.approx(1 / 3)
    assert m["completions/mean_terminated_length"] == 2.0
    assert (m["completions/min_terminated_length"], m["completions/max_terminated_length"]) == (1.0, 3.0)
    none = rollout.completion_metrics(None, mask, torch.zeros(3, dtype=torch.bool))
    assert none["completions/clipped_ratio"] == 1.0 and none["completions/mean_terminated_length"] == 0.0


def test_sampler_gap_by_hand_nan_tokens_left_out():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    sampler = torch.tensor([[-1.5, float("nan")], [-0.5, -0.3]])  # narrower; one token not scored
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    m = rollout.sampler_gap_metrics(None, trainer, sampler, mask)
    d = torch.tensor([0.5, 0.0, -0.2], dtype=torch.float64)
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(d.abs().mean().item(), abs=1e-6)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(0.5, abs=1e-6)
    assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(math.exp(-0.2), abs=1e-6)
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(d.exp().mean().item(), abs=1e-6)
    assert rollout.sampler_gap_metrics(None, trainer, sampler, torch.zeros(2, 3)) == {}
    # per micro-batch lists give the token-weighted gap of the whole batch
    parts = rollout.sampler_gap_metrics(None, [trainer[:1], trainer[1:]], [sampler[:1], sampler[1:]],
                                        [mask[:1], mask[1:]])
    assert parts == pytest.approx(m)


class _TwoRanks:
    """Rank 0 of two: `gather` returns this rank's tensor stacked over the one rank 1 sent (recorded beforehand)."""
    num_processes, device = 2, "cpu"

    def __init__(self, other=None):
        self.other, self.sent = other, None

    def gather(self, t):
        self.sent = t
        return torch.cat([t, self.other if self.other is not None else t])


def test_metrics_are_reduced_over_processes():
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(4, 6, generator=g) < 0.7).long() for _ in range(2)]
    masks[1][:, 0] = 1
    terms = [torch.tensor([True, False, True, True]), torch.tensor([False, False, True, False])]
    logps = [torch.randn(4, 6, generator=g) for _ in range(2)]
    samp = [lp + 0.1 * torch.randn(4, 6, generator=g) for lp in logps]
    for fn, args in ((rollout.completion_metrics, lambda r: (masks[r], terms[r])),
                     (rollout.sampler_gap_metrics, lambda r: (logps[r], samp[r], masks[r]))):
        rank1 = _TwoRanks()
        fn(rank1, *args(1))
        together = fn(_TwoRanks(rank1.sent), *args(0))
        concat = [torch.cat([a, b]) for a, b in zip(args(0), args(1))]
        assert together == pytest.approx(fn(None, *concat)), fn.__name__


def test_reward_inputs_layout():
    prompts, cols = rollout.repeat_rows([2, 0], ["a", "b", "c"], {"answer": [1, 2, 3]}, 2)
    assert prompts == ["c", "c", "a", "a"] and cols == {"answer": [3, 3, 1, 1]}
    assert rollout.as_completions(["x", [{"role": "user", "content": "y"}]], ["1", "2"]) == \
        ["1", [{"role": "assistant", "content": "2"}]]
    ids, mask = torch.tensor([[5, 6, 0], [7, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert rollout.completion_id_lists(ids, mask) == [[5, 6], [7]]
