"""Reply generation shared by chat / serve / eval (slackdist/generate.py), on a tiny model + adapter."""

from __future__ import annotations

import copy
import dataclasses
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from inference_helpers import write_tiny_adapter

from slackdist.config import ChatConfig
from slackdist.generate import (
    DEFAULT_CONTEXT_TOKENS,
    GenerationSettings,
    IncrementalDecoder,
    PromptTooLongError,
    ReplyStats,
    context_limit,
    reply,
    stream_reply,
    trim_history,
)
from slackdist.model.load import load_for_inference, load_tokenizer
from slackdist.model.template import build_prompt_ids, encode_chat

GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)
CHAT = [
    {"role": "system", "content": "You are a member of the acme Slack workspace."},
    {"role": "user", "content": "Ada: is the build green?"},
    {"role": "assistant", "content": "Yes, all tests pass."},
    {"role": "user", "content": "Grace: can we deploy today?"},
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("gen") / "out")


@pytest.fixture(scope="module")
def im(adapter_dir: Path):
    return load_for_inference(str(adapter_dir), device="cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def _turns(n: int, words: int = 6) -> list[dict[str, str]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * words}
        for i in range(n)
    ]


# ---------------------------------------------------------------- trim_history


def test_trim_history_keeps_system_and_newest_turns_and_fits(tokenizer):
    system = {"role": "system", "content": "You are on the team."}
    messages = [system, *_turns(11)]
    full = len(build_prompt_ids(tokenizer, messages))
    limit, reserve = full // 2, 8
    kept = trim_history(tokenizer, messages, limit, reserve)
    assert kept[0] == system
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]  # a suffix: the newest turns
    assert kept[1]["role"] == "user" and kept[-1] == messages[-1]
    assert len(build_prompt_ids(tokenizer, kept)) + reserve <= limit
    # maximal: the next older user-started window would not have fit
    start = len(messages) - len(kept) + 1
    longer = [system, *messages[start - 2 :]]
    assert len(build_prompt_ids(tokenizer, longer)) + reserve > limit
    assert trim_history(tokenizer, messages, full + reserve, reserve) == messages  # fits: unchanged


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=12), limit=st.integers(40, 400))
def test_trim_history_property(tokenizer, lengths, limit):
    system = {"role": "system", "content": "sys"}
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "x " * n} for i, n in enumerate(lengths)
    ]
    if turns[-1]["role"] != "user":
        turns = turns[:-1]
    if not turns:
        return
    messages = [system, *turns]
    try:
        kept = trim_history(tokenizer, messages, limit, 10)
    except PromptTooLongError:
        assert len(build_prompt_ids(tokenizer, [system, turns[-1]])) + 10 > limit
        return
    assert kept[0] == system and kept[-1] == turns[-1]
    assert kept[1]["role"] == "user"
    assert len(build_prompt_ids(tokenizer, kept)) + 10 <= limit


def test_trim_history_raises_when_the_newest_turn_cannot_fit(tokenizer):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "word " * 200}]
    with pytest.raises(PromptTooLongError, match="tokens"):
        trim_history(tokenizer, messages, 100, 10)


# ---------------------------------------------------------------- prompts = training encoding


def test_prompt_ids_fed_to_the_model_are_the_training_prefix(im):
    """The ids the model receives for a conversation are exactly training's ids before the reply."""
    record = [*CHAT, {"role": "assistant", "content": "Sure, after lunch."}]
    train_ids, mask = encode_chat(im.tokenizer, record)
    reply_start = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]][-1]  # last assistant turn
    seen: list[list[int]] = []
    hook = im.model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(args[0][0].tolist())
    )
    try:
        reply(im, CHAT, GREEDY.replace(max_new_tokens=2))
    finally:
        hook.remove()
    assert seen[0] == train_ids[:reply_start]  # the prefill forward: the whole prompt
    assert seen[0] == build_prompt_ids(im.tokenizer, CHAT)


def test_context_is_the_length_the_model_was_trained_on(im, tiny_model_dir):
    shorter = copy.deepcopy(im.config)
    shorter.train.max_seq_len = 1000
    assert context_limit(dataclasses.replace(im, config=shorter), GenerationSettings()) == 1000
    assert context_limit(im, GenerationSettings(max_context_tokens=100)) == 100  # set on its own, it stays
    untrained = load_for_inference(str(tiny_model_dir), device="cpu")  # no training config
    assert untrained.config is None
    assert context_limit(untrained, GenerationSettings()) == DEFAULT_CONTEXT_TOKENS


def test_settings_from_config():
    chat = ChatConfig(temperature=0.2, top_p=0.5, max_new_tokens=7, repetition_penalty=1.3, seed=3)
    s = GenerationSettings.from_config(chat)
    assert (s.temperature, s.top_p, s.max_new_tokens, s.repetition_penalty, s.seed) == (0.2, 0.5, 7, 1.3, 3)


# ---------------------------------------------------------------- streaming


def test_stream_reply_yields_text_and_counts_tokens(im):
    stats = ReplyStats()
    pieces = list(stream_reply(im, CHAT, GREEDY, stats=stats))
    assert pieces and all(isinstance(p, str) and p for p in pieces)
    text = "".join(pieces)
    assert text == reply(im, CHAT, GREEDY)  # greedy: deterministic
    assert stats.prompt_tokens == len(build_prompt_ids(im.tokenizer, CHAT))
    assert 1 <= stats.completion_tokens <= GREEDY.max_new_tokens
    assert stats.finish_reason in ("stop", "length")
    assert stats.first_token_s is not None and 0 < stats.first_token_s <= stats.total_s


def test_stop_event_ends_the_reply_early(im):
    stop = threading.Event()
    stats = ReplyStats()
    long = GREEDY.replace(max_new_tokens=400, min_new_tokens=400)
    pieces = []
    for piece in stream_reply(im, CHAT, long, stop_event=stop, stats=stats):
        pieces.append(piece)
        stop.set()
    assert pieces
    assert stats.completion_tokens < 50
    assert stats.finish_reason == "cancelled"
    # the worker is free again: the next reply runs normally
    assert reply(im, CHAT, GREEDY)


def test_abandoned_stream_frees_the_worker(im):
    long = GREEDY.replace(max_new_tokens=400, min_new_tokens=400)
    stream = stream_reply(im, CHAT, long)
    next(stream)
    stream.close()  # a client that went away
    stats = ReplyStats()
    reply(im, CHAT, GREEDY, stats=stats)
    assert stats.completion_tokens <= GREEDY.max_new_tokens


def test_stop_strings_cut_the_reply(im):
    full = reply(im, CHAT, GREEDY.replace(max_new_tokens=24))
    cut_at = full[len(full) // 2 : len(full) // 2 + 2]
    assert cut_at.strip(), f"reply too uniform to test stop strings: {full!r}"
    stats = ReplyStats()
    cut = reply(im, CHAT, GREEDY.replace(max_new_tokens=24, stop=(cut_at,)), stats=stats)
    assert cut == full[: full.index(cut_at)]
    assert stats.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(im):
    sampled = GenerationSettings(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=7)
    assert reply(im, CHAT, sampled) == reply(im, CHAT, sampled)


def test_base_reply_is_the_base_model_and_differs_from_tuned(im, tiny_model_dir):
    base_only = load_for_inference(str(tiny_model_dir), device="cpu")
    assert base_only.kind == "merged"
    base = reply(im, CHAT, GREEDY, adapter=False)
    assert base == reply(base_only, CHAT, GREEDY)
    assert base != reply(im, CHAT, GREEDY)
    with pytest.raises(Exception, match="no adapter"):
        reply(base_only, CHAT, GREEDY, adapter=False)


def test_prompt_longer_than_the_context_is_refused(im):
    with pytest.raises(PromptTooLongError):
        reply(im, CHAT, GREEDY.replace(max_context_tokens=10))


def test_generation_errors_reach_the_caller(im):
    with pytest.raises(ValueError):
        reply(im, [{"role": "robot", "content": "hi"}], GREEDY)


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_incremental_decoder_reassembles_any_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    streamed = "".join(decoder.add(i) for i in ids)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_fast_path_off_on_cpu(im):
    from slackdist.generate import use_fast_path

    assert not use_fast_path(im, GREEDY)
    assert torch.device("cpu") == next(im.model.parameters()).device


def test_adapter_merged_in_memory_replies_like_the_adapter(adapter_dir: Path, im) -> None:
    """The fast path's model on an adapter folder: the adapter folded into the base in memory (no
    files written) gives the same greedy replies as the base + adapter it came from."""
    from slackdist.model.load import merge_in_memory

    loaded = load_for_inference(str(adapter_dir), device="cpu", merge="on")
    assert loaded.kind == "adapter" and loaded.mergeable
    merged = merge_in_memory(loaded)
    assert (
        merged.kind == "merged" and merged.merged_in_memory and not hasattr(merged.model, "disable_adapter")
    )
    assert merged.model.lm_head.weight.data_ptr() != merged.model.model.embed_tokens.weight.data_ptr()
    for messages in (CHAT, CHAT[:2]):
        assert reply(merged, messages, GREEDY) == reply(im, messages, GREEDY)
    assert reply(merged, CHAT, GREEDY) != reply(im, CHAT, GREEDY, adapter=False)  # the adapter is in it
    assert merge_in_memory(im) is im  # not mergeable: left as it is


@pytest.mark.parametrize(
    ("merge", "load_in_4bit", "expected"),
    [
        ("auto", None, (False, False)),  # CPU: no fast path to gain, nothing merged
        ("off", None, (False, False)),
        ("on", None, (False, True)),
        ("off", True, (True, False)),
    ],
)
def test_plan_adapter_load_on_cpu(tiny_model_dir: Path, merge: str, load_in_4bit, expected) -> None:
    from slackdist.model.load import plan_adapter_load

    quantize, mergeable, note = plan_adapter_load(
        str(tiny_model_dir), device="cpu", load_in_4bit=load_in_4bit, merge=merge
    )
    assert (quantize, mergeable) == expected and note is None


def test_merge_on_with_a_4bit_base_is_a_clear_error(tiny_model_dir: Path) -> None:
    from slackdist.errors import SlackdistError
    from slackdist.model.load import plan_adapter_load, sixteen_bit_bytes

    with pytest.raises(SlackdistError, match="needs a 16-bit base"):
        plan_adapter_load(str(tiny_model_dir), device="cpu", load_in_4bit=True, merge="on")
    n_params = sum(p.numel() for p in torch.nn.Module.parameters(_tiny(tiny_model_dir)))
    assert sixteen_bit_bytes(str(tiny_model_dir)) == 2 * n_params


def _tiny(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)
