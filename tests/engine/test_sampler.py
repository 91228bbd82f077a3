"""Tests for the sampler: greedy, seeded draws, truncation, biases, penalties and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from llamaserve.engine.sampler import Sampler, _argmax, _draw
from llamaserve.engine.sampling_params import SamplingParams
from llamaserve.engine.sequence import Sequence

VOCAB = 50
EOS = 7


def make_seq(
    seq_id: int = 0, prompt: list[int] | None = None, output: list[int] | None = None, **params
) -> Sequence:
    prompt = [1, 2, 3] if prompt is None else prompt
    output = output or []
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        token_ids=prompt + output,
        num_prompt_tokens=len(prompt),
        params=SamplingParams(max_tokens=100, **params),
    )


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_leaves_input_alone() -> None:
    logits = random_logits(6).to(torch.bfloat16)
    before = logits.clone()
    seqs = [make_seq(i, temperature=0.0) for i in range(6)]
    out = Sampler(VOCAB, [EOS]).sample(logits, seqs)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6
    assert torch.equal(logits, before)


@pytest.mark.parametrize("params", [
    {"logit_bias": {3: 100.0}}, {"repetition_penalty": 1.5}, {"presence_penalty": 1.0},
    {"frequency_penalty": 1.0}, {"min_tokens": 2},
])
def test_stages_that_modify_logits_work_on_a_copy_of_float32_input(params) -> None:
    """float32 logits are only copied when a stage modifies them (a view otherwise): every stage that does
    must still leave the caller's tensor alone."""
    logits = random_logits(3)
    before = logits.clone()
    seqs = [make_seq(0, temperature=0.0), make_seq(1, output=[1, 2], temperature=0.0, **params),
            make_seq(2, temperature=0.7, top_p=0.9)]
    Sampler(VOCAB, [EOS], seed=0).sample(logits, seqs)
    assert torch.equal(logits, before)


def test_the_cpu_argmax_picks_what_torchs_picks_ties_nan_and_inf_included() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (40, 300), generator=g).float()  # many ties: the first maximum must win
    x[5] = float("-inf")
    x[6, 17], x[6, 250] = float("nan"), float("nan")  # NaN counts as the maximum, its first one
    x[7, 0] = float("inf")
    x[8, 299] = float("inf")
    view = x[:, :257]  # a strided view, as the sampler's vocab slice is when the head is padded
    for t in (x, view, x[:1]):
        got = _argmax(t)
        assert got.dtype == torch.int64 and got.shape == (t.shape[0],)
        assert torch.equal(got, t.argmax(dim=-1))
    assert _argmax(x)[6] == 17 and _argmax(x)[5] == 0


def test_padding_columns_are_never_sampled() -> None:
    logits = random_logits(2, VOCAB + 14)
    logits[:, VOCAB:] = 100.0  # padded vocabulary columns
    out = Sampler(VOCAB, [EOS], seed=0).sample(logits, [make_seq(0, temperature=0.0), make_seq(1)])
    assert all(t < VOCAB for t in out.token_ids)


def test_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        Sampler(VOCAB, [EOS]).sample(random_logits(3), [make_seq(0)])


def test_seeded_sampling_repeats_and_ignores_the_rest_of_the_batch() -> None:
    def run(batch: bool) -> list[int]:
        sampler = Sampler(VOCAB, [EOS], seed=123)
        target = make_seq(0, temperature=1.0, seed=42)
        others = [
            make_seq(1, temperature=0.8, seed=7),
            make_seq(2, temperature=1.0),
            make_seq(3, temperature=0.0),
            make_seq(4, temperature=1.3, top_k=5),
            make_seq(5, temperature=0.9, top_p=0.5, seed=42),
            make_seq(6, temperature=1.0, min_p=0.1),
            make_seq(7, temperature=0.7, repetition_penalty=1.3),
        ]
        seqs = [others[0], others[1], target, *others[2:]] if batch else [target]
        tokens = []
        for step in range(20):
            logits = random_logits(8, seed=1000 + step)  # row 0 is always the target's logits
            rows = [logits[1], logits[2], logits[0], *logits[3:]] if batch else [logits[0]]
            out = sampler.sample(torch.stack(rows), seqs)
            for seq, token in zip(seqs, out.token_ids, strict=True):
                seq.token_ids.append(token)
            tokens.append(out.token_ids[seqs.index(target)])
        return tokens

    alone = run(batch=False)
    assert alone == run(batch=False)
    assert alone == run(batch=True)
    assert len(set(alone)) > 3  # it really sampled


def test_seed_depends_on_choice_index_and_forget_restarts() -> None:
    sampler = Sampler(VOCAB, [EOS])
    logits = torch.zeros(2, VOCAB)
    first, second = make_seq(0, seed=5), make_seq(1, seed=5)
    second.index = 1
    draws = [sampler.sample(logits, [first, second]).token_ids for _ in range(10)]
    assert [a for a, _ in draws] != [b for _, b in draws]
    sampler.forget(0)
    assert [sampler.sample(logits[:1], [first]).token_ids[0] for _ in range(10)] == [a for a, _ in draws]


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    logits = random_logits(8)
    greedy = logits.argmax(dim=-1).tolist()
    sampler = Sampler(VOCAB, [EOS], seed=0)
    seqs = [make_seq(i, temperature=1.5, top_k=1) if i % 2 else make_seq(i, top_p=1e-6) for i in range(8)]
    for _ in range(5):
        assert sampler.sample(logits, seqs).token_ids == greedy


def test_top_k_limits_to_k_best() -> None:
    logits = random_logits(1)
    best3 = set(logits[0].topk(3).indices.tolist())
    sampler = Sampler(VOCAB, [EOS], seed=0)
    seqs = [make_seq(i, temperature=2.0, top_k=3) for i in range(400)]
    drawn = set(sampler.sample(logits.expand(400, -1), seqs).token_ids)
    assert drawn == best3


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, :3] = torch.tensor([2.0, 1.8, 0.0])  # p(2) / p(0) = e^-2 ~ 0.135 < min_p
    sampler = Sampler(VOCAB, [EOS], seed=0)
    seqs = [make_seq(i, temperature=1.0, min_p=0.2) for i in range(500)]
    assert set(sampler.sample(logits.expand(500, -1), seqs).token_ids) == {0, 1}


def test_logit_bias_forces_a_token() -> None:
    logits = random_logits(4)
    sampler = Sampler(VOCAB, [EOS], seed=0)
    seqs = [make_seq(i, temperature=float(i % 2), logit_bias={11: 100.0}) for i in range(4)]
    assert sampler.sample(logits, seqs).token_ids == [11] * 4


def test_logit_bias_outside_vocab_raises() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Sampler(VOCAB, [EOS]).sample(random_logits(1), [make_seq(0, logit_bias={VOCAB: 1.0})])


def test_min_tokens_blocks_eos_and_stop_tokens() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 9], logits[0, 3] = 20.0, 19.0, 18.0
    sampler = Sampler(VOCAB, [EOS])
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=[9])
    assert sampler.sample(logits, [make_seq(0, output=[], **params)]).token_ids == [3]
    assert sampler.sample(logits, [make_seq(0, output=[5], **params)]).token_ids == [3]
    assert sampler.sample(logits, [make_seq(0, output=[5, 5], **params)]).token_ids == [EOS]
    ignoring = make_seq(0, temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler.sample(logits, [ignoring]).token_ids == [EOS]


def test_repetition_penalty_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0, 1.0]])
    seq = make_seq(0, prompt=[0, 1], output=[3, 0], repetition_penalty=2.0)
    got = Sampler(6, [5]).process_logits(logits, [seq])
    # tokens 0, 1, 3 seen (prompt and output): positive / 2, negative * 2; others unchanged
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 0.5, -6.0, 4.0, 1.0]]))


def test_presence_and_frequency_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0, 1.0]])
    seq = make_seq(0, prompt=[4, 4, 5], output=[2, 2, 2, 1], presence_penalty=0.5, frequency_penalty=0.25)
    plain = make_seq(1, prompt=[4], output=[2])
    got = Sampler(6, [5]).process_logits(logits.expand(2, -1), [seq, plain])
    # output only: token 2 three times (3 * 0.25 + 0.5), token 1 once (0.25 + 0.5); prompt ignored
    assert torch.allclose(got[0], torch.tensor([2.0, -1.75, -0.75, -3.0, 4.0, 1.0]))
    assert torch.equal(got[1], logits[0])


def test_all_processing_stages_compose() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0, 1.0]])
    seq = make_seq(
        0,
        prompt=[0],
        output=[4],
        logit_bias={1: 1.5},
        repetition_penalty=2.0,
        frequency_penalty=1.0,
        min_tokens=5,
    )
    got = Sampler(6, [5]).process_logits(logits, [seq])
    expected = torch.tensor([[1.0, 0.5, 0.5, -3.0, 1.0, float("-inf")]])
    assert torch.equal(got, expected)


def test_logprobs_come_from_raw_logits() -> None:
    logits = random_logits(3)
    seqs = [
        make_seq(0, temperature=0.0, logprobs=5, logit_bias={13: 50.0}),
        make_seq(1, temperature=1.0, logprobs=0, repetition_penalty=1.5),
        make_seq(2, temperature=0.0),
    ]
    out = Sampler(VOCAB, [EOS], seed=0).sample(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.token_ids[0] == 13  # the bias chose it, but its logprob is the unbiased one
    assert out.logprobs[2] is None
    for row in (0, 1):
        lp = out.logprobs[row]
        assert lp is not None and lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(raw[row, lp.token_id].item(), abs=1e-5)
    top = out.logprobs[0].top
    assert [t for t, _ in top] == raw[0].topk(5).indices.tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert all(v == pytest.approx(raw[0, t].item(), abs=1e-5) for t, v in top)
    assert out.logprobs[1].top == []


def test_temperature_draws_follow_softmax() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    temperature, draws = 0.7, 8000
    sampler = Sampler(4, [3], seed=1)
    seqs = [make_seq(i, temperature=temperature) for i in range(draws)]
    counts = torch.bincount(
        torch.tensor(sampler.sample(logits.expand(draws, -1), seqs).token_ids), minlength=4
    )
    expected = torch.softmax(logits[0] / temperature, dim=-1) * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0  # 3 degrees of freedom: p ~ 2e-5
    assert not math.isnan(chi2)


def test_seeded_temperature_draws_follow_softmax() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    sampler = Sampler(4, [3])
    seq = make_seq(0, temperature=1.0, seed=3)
    counts = torch.zeros(4)
    for _ in range(3000):
        counts[sampler.sample(logits, [seq]).token_ids[0]] += 1
    expected = torch.softmax(logits[0], dim=-1) * 3000
    assert ((counts - expected) ** 2 / expected).sum().item() < 25.0


def _reference_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The textbook inverse CDF over the whole row, in float64."""
    cdf = probs.double().cumsum(dim=-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)[:, 0]


@pytest.mark.parametrize("vocab", [5, 256, 1000, 49152])
def test_two_level_draw_is_the_inverse_cdf(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(torch.randn(64, vocab, generator=gen) * 4, dim=-1)
    u = torch.rand(64, dtype=torch.float64, generator=gen)
    drawn = _draw(probs, u)
    reference = _reference_draw(probs, u)
    # Two-level sums round differently from one long cumsum only where u lands within ~1e-12 of a
    # boundary: with these draws, never.
    assert torch.equal(drawn, reference)


def test_draw_never_picks_a_zero_probability_token() -> None:
    vocab = 700  # not a multiple of the 256-token blocks: the last block is padded
    probs = torch.zeros(6, vocab)
    probs[0, 3] = 1.0  # one token only, in the first block
    probs[1, vocab - 1] = 1.0  # the last real token, next to the padding
    probs[2, [255, 256]] = 0.5  # either side of a block boundary
    probs[3, 300:310] = 0.1  # a block whose first and last tokens are 0
    probs[4, 0] = 1e-30  # a tiny mass beside a big one
    probs[4, 699] = 1.0
    probs[5, 511] = 1.0  # the last token of a block, followed by empty blocks
    for u in [0.0, 1e-300, 0.5, 1 - 2**-53, math.nextafter(1.0, 0.0)]:
        drawn = _draw(probs, torch.full((6,), u, dtype=torch.float64))
        assert all(probs[r, t] > 0 for r, t in enumerate(drawn.tolist())), (u, drawn.tolist())
    assert _draw(probs[2:3], torch.tensor([0.25], dtype=torch.float64)).item() == 255
    assert _draw(probs[2:3], torch.tensor([0.75], dtype=torch.float64)).item() == 256


def test_a_rows_draw_does_not_depend_on_the_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(16, 49152, generator=gen), dim=-1)
    u = torch.rand(16, dtype=torch.float64, generator=gen)
    together = _draw(probs, u)
    alone = torch.cat([_draw(probs[i : i + 1], u[i : i + 1]) for i in range(16)])
    assert torch.equal(together, alone)
