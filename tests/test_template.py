"""The Llama 3 chat template, the assistant mask and prompt ids (slackdist/model/template.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slackdist.model.template import (
    GENERIC_CHAT_TEMPLATE,
    LLAMA3_CHAT_TEMPLATE,
    build_prompt_ids,
    encode_chat,
    ensure_chat_template,
    stop_token_ids,
)

# Meta's template from Meta-Llama-3-8B-Instruct/tokenizer_config.json (the 3.1+ templates render the
# same turns, plus date and tools boilerplate in the system turn, which we leave out).
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

CHAT = [
    {"role": "system", "content": "You are a member of the acme Slack workspace."},
    {"role": "user", "content": "Jane: is the deploy done?\n```\nmake deploy\n```"},
    {"role": "assistant", "content": "Bob: yes, 5 minutes ago 👍  "},
    {"role": "user", "content": "Jane: thanks!"},
    {"role": "assistant", "content": "Bob: np"},
]

EXPECTED = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a member of the acme Slack workspace.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nJane: is the deploy done?\n```\nmake deploy\n```<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nBob: yes, 5 minutes ago 👍<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nJane: thanks!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nBob: np<|eot_id|>"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_template_renders_the_llama3_string(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == EXPECTED
    assert "\\n" not in text  # real newlines, never a literal backslash-n


def test_template_matches_metas_rendering(tokenizer):
    for add_generation_prompt, chat in [(False, CHAT), (True, CHAT[:-1]), (True, CHAT[:2])]:
        ours = tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        meta = tokenizer.apply_chat_template(
            chat,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=META_LLAMA3_TEMPLATE,
        )
        assert ours == meta


def test_generation_prompt_ends_with_assistant_header(tokenizer):
    text = tokenizer.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def _masked_text(tokenizer, ids, mask, want):
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m == want])


def test_mask_is_exactly_the_assistant_content_and_eot(tokenizer):
    ids, mask = encode_chat(tokenizer, CHAT)
    assert len(ids) == len(mask)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert _masked_text(tokenizer, ids, mask, 1) == "Bob: yes, 5 minutes ago 👍<|eot_id|>Bob: np<|eot_id|>"
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    # two masked spans, each ending on <|eot_id|> and starting right after an assistant header's "\n\n"
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    assert len(spans) == 2
    for a, b in spans:
        assert ids[b - 1] == eot
        assert tokenizer.decode(ids[:a]).endswith("assistant<|end_header_id|>\n\n")
    # the unmasked rest decodes to the whole template text minus the assistant content
    assert _masked_text(tokenizer, ids, mask, 0) == EXPECTED.replace(
        "Bob: yes, 5 minutes ago 👍<|eot_id|>", ""
    ).replace("Bob: np<|eot_id|>", "")


def test_prompt_ids_are_a_prefix_of_training_ids(tokenizer):
    ids, mask = encode_chat(tokenizer, CHAT)
    prompt = build_prompt_ids(tokenizer, CHAT[:-1])
    assert ids[: len(prompt)] == prompt
    assert all(mask[len(prompt) :]) and not mask[len(prompt) - 1]
    assert tokenizer.decode(ids[len(prompt) :]) == "Bob: np<|eot_id|>"


def test_encode_chat_rejects_bad_messages(tokenizer):
    with pytest.raises(ValueError, match="message 1"):
        encode_chat(tokenizer, [{"role": "system", "content": "x"}, {"role": "bot", "content": "y"}])
    with pytest.raises(ValueError, match="message 0"):
        encode_chat(tokenizer, [{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="non-empty"):
        encode_chat(tokenizer, [])


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40).filter(
    lambda s: "<|" not in s
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=_text, turns=st.lists(st.tuples(_text, _text), min_size=1, max_size=3))
def test_mask_and_prefix_property(tokenizer, system, turns):
    msgs = [{"role": "system", "content": system}]
    for user, assistant in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    ids, mask = encode_chat(tokenizer, msgs)
    assert _masked_text(tokenizer, ids, mask, 1) == "".join(a.strip() + "<|eot_id|>" for _, a in turns)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
    prompt = build_prompt_ids(tokenizer, msgs[:-1])
    assert ids[: len(prompt)] == prompt
    assert tokenizer.decode(ids[len(prompt) :]) == turns[-1][1].strip() + "<|eot_id|>"


def test_ensure_chat_template_replaces_a_template_without_markers(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = META_LLAMA3_TEMPLATE
    tok.pad_token = None
    ensure_chat_template(tok)
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    eot, end = tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert stop_token_ids(tok) == [eot, end]


def test_ensure_chat_template_on_a_non_llama_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    raw.train_from_iterator(["hello world, how are you?"], trainer=trainer)
    raw.add_special_tokens(["</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    ensure_chat_template(tok)
    assert tok.chat_template == GENERIC_CHAT_TEMPLATE
    assert tok.pad_token == "</s>"
    ids, mask = encode_chat(tok, CHAT[:3])
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "Bob: yes, 5 minutes ago 👍</s>"
    assert tok.decode(build_prompt_ids(tok, CHAT[:2])).endswith("</s>\n### assistant:\n")
