"""Generation: batching with left padding, eos and stop strings, seeded sampling, and the logit processors."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlkit.models import create_model
from vlkit.models.generate import (
    apply_repetition_penalty,
    generate,
    left_pad,
    process_logits,
    top_p_filter,
    trim_at_stop,
)

PROMPTS = [[1, 5, 9, 33, 17, 80, 3], [1, 44, 12], [1, 7, 250, 7, 7]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("llama-tiny").eval()
    with torch.no_grad():  # a livelier random model than the 0.02 init, so greedy does not just repeat a token
        for p in m.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    return m


def test_left_padded_batch_generates_what_each_prompt_does_alone(model):
    ids, mask = left_pad(PROMPTS)
    assert mask.tolist()[1] == [0, 0, 0, 0, 1, 1, 1]
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_ids=[])
    assert batch.tokens.shape == (3, 12) and batch.finish_reasons == ["length"] * 3
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=12, eos_token_ids=[])
        assert batch.rows()[i] == alone.rows()[0]
    assert len(set(batch.rows()[0])) > 3  # not a degenerate repetition


def test_greedy_is_the_argmax_of_the_full_forward(model):
    ids = torch.tensor([PROMPTS[0]])
    out = generate(model, ids, max_new_tokens=6, eos_token_ids=[])
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.rows()[0] == seq[0, ids.shape[1] :].tolist()


def test_inputs_embeds_prompt_equals_ids_prompt(model):
    ids, mask = left_pad(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_ids=[], repetition_penalty=1.5)
    a = generate(model, ids, **kw)
    embeds = model.llm.embed(ids)
    assert torch.equal(generate(model, ids, inputs_embeds=embeds, **kw).tokens, a.tokens)
    # Without the ids only the generated tokens are penalised, as with ids the penalty cannot read (placeholders).
    placeholders = torch.full_like(ids, -200)
    alone = generate(model, inputs_embeds=embeds, **kw).tokens
    assert torch.equal(alone, generate(model, placeholders, inputs_embeds=embeds, **kw).tokens)


def test_eos_ends_a_row_and_pads_after_it(model):
    ids, mask = left_pad(PROMPTS)
    free = generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_token_ids=[])
    eos = free.rows()[1][3]  # row 1's fourth token becomes its end
    first = [row.index(eos) if eos in row else None for row in free.rows()]
    out = generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_token_ids=[eos], pad_token_id=0)
    for i, row in enumerate(out.rows()):
        if first[i] is None:
            assert out.finish_reasons[i] == "length" and row == free.rows()[i]
        else:
            assert out.finish_reasons[i] == "eos" and row == free.rows()[i][: first[i] + 1]
            assert out.tokens[i, first[i] + 1 :].eq(0).all()
    assert out.lengths[1] == first[1] + 1 <= 4


def test_stop_strings_end_a_row_through_the_decode_callback(model):
    ids = torch.tensor([PROMPTS[0]])
    free = generate(model, ids, max_new_tokens=10, eos_token_ids=[]).rows()[0]

    def decode(tokens):
        return "".join(f"<{t}>" for t in tokens)

    stop = f"<{free[2]}><{free[3]}>"  # spans two tokens
    out = generate(model, ids, max_new_tokens=10, eos_token_ids=[], stop_strings=[stop], decode=decode)
    cut = decode(free).index(stop)
    assert out.finish_reasons == ["stop"]
    assert decode(out.rows()[0]).index(stop) == cut and len(out.rows()[0]) <= 4
    assert trim_at_stop(decode(out.rows()[0]), [stop]) == decode(free)[:cut]
    with pytest.raises(ValueError, match="decode callback"):
        generate(model, ids, stop_strings=["x"])


def test_seeded_sampling_repeats_and_seeds_differ(model):
    ids, mask = left_pad(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=15, do_sample=True, temperature=1.5, eos_token_ids=[])
    a = generate(model, ids, seed=3, **kw)
    torch.manual_seed(123)  # the global RNG does not matter
    b = generate(model, ids, seed=3, **kw)
    c = generate(model, ids, seed=4, **kw)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_sampling_with_one_candidate_is_greedy(model):
    ids, mask = left_pad(PROMPTS)
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_ids=[])
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = generate(
            model, ids, attention_mask=mask, max_new_tokens=8, do_sample=True, seed=0, eos_token_ids=[], **kw
        )
        assert torch.equal(sampled.tokens, greedy.tokens), kw


def test_repetition_penalty_counts_each_real_token_once():
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0]])
    tokens = torch.tensor([[0, 0, 1, 3]])
    valid = torch.tensor([[True, True, True, False]])  # position 3 is padding: token 3 is not penalised
    out = apply_repetition_penalty(logits, tokens, 2.0, valid)
    assert out.tolist() == [[1.0, -4.0, 1.0, 4.0]]
    placeholders = torch.tensor([[-200, 2, 9]])  # out-of-vocabulary ids (image placeholders) are skipped
    assert apply_repetition_penalty(logits, placeholders, 2.0).tolist() == [[2.0, -2.0, 0.5, 4.0]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isinf(top_p_filter(logits, 0.8)).tolist() == [[False, False, True]]
    assert torch.isinf(top_p_filter(logits, 0.81)).tolist() == [[False, False, False]]
    assert torch.isinf(top_p_filter(logits, 0.3)).tolist() == [[False, True, True]]


def test_processing_matches_hugging_face_processors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    history = torch.randint(0, 50, (4, 12), generator=g)
    ours = process_logits(
        logits, history, None, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3
    )
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)):
        theirs = proc(history, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_bad_settings_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([PROMPTS[0]]), **kwargs)


def test_right_padded_prompts_are_refused(model):
    ids = torch.tensor([[1, 5, 0]])
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, attention_mask=torch.tensor([[1, 1, 0]]))
