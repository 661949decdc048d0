"""Tokenizer interface: HF tokenizer.json and SentencePiece, checked against transformers and
sentencepiece on tiny tokenizers trained offline in tmp dirs."""

import json
import os
import random

import numpy as np
import pytest

from metastone_jax.data.tokenizer import (
    ChatTemplateError,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    render_chat_template,
)

BOS, EOS, PAD = "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>", "<|▁pad▁|>"
SPECIALS = [BOS, EOS, PAD, "<|User|>", "<|Assistant|>", "<think>", "</think>"]
WORDS = (
    "the a step answer compute sum of and is think number 12 345 x y z plus minus equals "
    "so = + - * ( ) . , ? ! café naïve résumé 数学 题 😀 ∑ √"
).split()

# DeepSeek-R1-like: namespace, system branch, loop, think stripping, tools via tojson,
# raise_exception on an unknown role, generation prompt.
R1_TEMPLATE = """
{%- if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}
{% set ns = namespace(system_prompt='') %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system_prompt = message['content'] %}
    {% endif %}
{% endfor %}
{{- bos_token }}{{ ns.system_prompt -}}
{% if tools %}
    {{- '\\n<tools>' + (tools | tojson) + '</tools>\\n' -}}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{- '<|User|>' + message['content'] -}}
    {% elif message['role'] == 'assistant' %}
        {% set content = message['content'] %}
        {% if '</think>' in content %}
            {% set content = content.split('</think>')[-1] %}
        {% endif %}
        {{- '<|Assistant|>' + content + eos_token -}}
    {% elif message['role'] != 'system' %}
        {{- raise_exception('Unsupported role: ' + message['role']) -}}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|Assistant|><think>\\n' -}}
{% endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 345?"}],
    [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "数学: √2 ≈ ? 😀"},
    ],
    [
        {"role": "user", "content": "sum of 1 and 2"},
        {"role": "assistant", "content": "<think>\n1 + 2 = 3\n</think>\n\nThe answer is 3."},
        {"role": "user", "content": "  and café?  \n"},
    ],
]

TEXTS = [
    "the sum of 12 and 345 is 357.",
    "café naïve résumé 数学题 😀 ∑√ — unseen: ß Ж",
    f"{BOS}<|User|>compute x<|Assistant|><think>\nstep 1\n</think>answer{EOS}",
    "  leading and trailing spaces \n\t tabs\n\n",
    "",
]


def _lines(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def _added_token(content):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """Byte-level BPE tokenizer.json (no post-processor) + DeepSeek-R1-like tokenizer_config."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_lines(), trainer)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    _write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": _added_token(BOS),
            "eos_token": _added_token(EOS),
            "pad_token": PAD,
            "unk_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": R1_TEMPLATE,
        },
    )
    _write_json(d / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [1, 5]})
    return d


@pytest.fixture(scope="module")
def hf_pair(bpe_dir):
    transformers = pytest.importorskip("transformers")
    return load_tokenizer(bpe_dir), transformers.AutoTokenizer.from_pretrained(str(bpe_dir))


def test_hf_loads_and_special_ids(hf_pair):
    ours, ref = hf_pair
    assert isinstance(ours, HFTokenizer) and isinstance(ours, Tokenizer)
    assert ours.vocab_size == len(ref)
    assert ours.bos_id == ref.bos_token_id == 0
    assert ours.eos_ids == (ref.eos_token_id, 5)  # config eos first, then generation_config
    assert ours.eos_id == 1
    assert ours.pad_id == ref.pad_token_id == 2
    assert ours.chat_template == R1_TEMPLATE
    for t in SPECIALS:
        assert ours.token_to_id(t) == ref.convert_tokens_to_ids(t)
        assert ours.id_to_token(ours.token_to_id(t)) == t
    assert ours.token_to_id("<not a token>") is None
    assert ours.id_to_token(10**6) is None and ours.id_to_token(-1) is None


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_hf_encode_decode_matches_transformers(hf_pair, add_special_tokens):
    ours, ref = hf_pair
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=add_special_tokens)
        assert ids == ref.encode(text, add_special_tokens=add_special_tokens), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    ids = ours.encode(TEXTS[2])
    assert ours.decode(np.asarray(ids, np.int32)) == TEXTS[2]  # arrays accepted, exact round trip
    assert ours.decode(ids, skip_special_tokens=True) == "compute x\nstep 1\nanswer"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_hf_chat_template_matches_transformers(hf_pair, conv, add_generation_prompt):
    ours, ref = hf_pair
    messages = CONVERSATIONS[conv]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    assert text.startswith(BOS) and text.endswith("<think>\n") == add_generation_prompt
    ids = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    ref_ids = ref.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ids == list(ref_ids)
    assert ids.count(ours.bos_id) == 1  # the template's BOS only, not added twice


def test_hf_chat_template_extra_variables(hf_pair):
    ours, ref = hf_pair
    tools = [{"name": "calc", "description": "évalue √x", "parameters": {"x": "number"}}]
    text = ours.apply_chat_template(CONVERSATIONS[0], tools=tools)
    assert text == ref.apply_chat_template(
        CONVERSATIONS[0], tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert "évalue √x" in text  # tojson keeps non-ASCII
    # An explicit template; reasoning fields are aliased as transformers does.
    template = "{% for m in messages %}{{ m.thinking }}|{{ m.reasoning_content }}|{% endfor %}"
    messages = [{"role": "assistant", "content": "x", "reasoning": "r"}]
    assert ours.apply_chat_template(messages, chat_template=template) == "r|r|"
    assert ref.apply_chat_template(messages, chat_template=template, tokenize=False) == "r|r|"
    # None-valued keys are dropped, as transformers does.
    messages = [{"role": "user", "content": "hi", "tool_calls": None}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_hf_raise_exception(hf_pair):
    ours, ref = hf_pair
    messages = [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]
    with pytest.raises(ValueError, match="Unsupported role: tool") as info:
        ours.apply_chat_template(messages)
    assert isinstance(info.value, ChatTemplateError)
    with pytest.raises(Exception, match="Unsupported role: tool"):
        ref.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="empty"):
        ours.apply_chat_template([])


def test_template_environment():
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m | tojson(indent=1) }}|{% endfor %}{{ strftime_now('%Y') | length }}"
        "{{ bos_token is defined }}{{ pad_token is defined }}"
    )
    messages = [{"role": "user", "content": "é"}] * 3
    out = render_chat_template(template, messages, special_tokens={"bos_token": "<s>"})
    one = json.dumps(messages[0], ensure_ascii=False, indent=1)
    assert out == f"{one}|{one}|4TrueFalse"
    with pytest.raises(ValueError, match=r"invalid chat template \(line 1\)"):
        render_chat_template("{% for m in messages %}", messages)
    # The sandbox refuses attribute escapes.
    with pytest.raises(Exception, match="unsafe|attribute"):
        render_chat_template("{{ messages.__class__.__mro__ }}", messages)


def test_chat_template_variants(bpe_dir, tmp_path):
    import shutil

    d = tmp_path / "variants"
    shutil.copytree(bpe_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    # A list of named templates: "default" is used.
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0]['content'] }}!"},
    ]
    _write_json(d / "tokenizer_config.json", config)
    tok = HFTokenizer.from_dir(d)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    assert tok.chat_templates["tool_use"] == "TOOLS"
    assert tok.apply_chat_template(CONVERSATIONS[0], chat_template="tool_use") == "TOOLS"
    # Without a "default" entry: an error naming the file and the templates it has.
    config["chat_template"] = config["chat_template"][:1]
    _write_json(d / "tokenizer_config.json", config)
    with pytest.raises(ValueError, match=r"tokenizer_config.json has no template named 'default'"):
        HFTokenizer.from_dir(d).apply_chat_template(CONVERSATIONS[0])
    # A template with a syntax error: the error names its file.
    config["chat_template"] = "{% if %}"
    _write_json(d / "tokenizer_config.json", config)
    with pytest.raises(ValueError, match=r"tokenizer_config.json: invalid chat template"):
        HFTokenizer.from_dir(d).apply_chat_template(CONVERSATIONS[0])
    # chat_template.jinja beside the config wins (newer transformers writes it).
    (d / "chat_template.jinja").write_text("[{{ eos_token }}]", encoding="utf-8")
    tok = load_tokenizer(d)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == f"[{EOS}]"
    # An explicit template overrides.
    assert tok.apply_chat_template(CONVERSATIONS[0], chat_template="{{ bos_token }}") == BOS
    # No template at all: a clear error naming the directory.
    os.remove(d / "chat_template.jinja")
    del config["chat_template"]
    _write_json(d / "tokenizer_config.json", config)
    tok = load_tokenizer(d)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=f"no chat template: {d} has no .*chat_template.jinja"):
        tok.encode_chat(CONVERSATIONS[0])


def test_hf_without_config(bpe_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None and tok.eos_ids == () and tok.pad_id is None
    assert tok.chat_template is None
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama-2-style tokenizer.json: Prepend/Replace normalizer, BPE with <unk>, BOS added by a
    TemplateProcessing post-processor."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, processors, trainers

    tok = Backend(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(_lines(seed=1), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    d = tmp_path_factory.mktemp("llama")
    tok.save(str(d / "tokenizer.json"))
    _write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": _added_token("<s>"),
            "eos_token": _added_token("</s>"),
            "unk_token": _added_token("<unk>"),
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
            "{{ m['content'] }}{{ eos_token }}{% endfor %}",
        },
    )
    return d


def test_llama_style_post_processor_bos(llama_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    ours = load_tokenizer(llama_dir)
    assert (ours.bos_id, ours.eos_ids, ours.pad_id) == (1, (2,), None)
    texts = ["the sum of 12", "  café 数学 ß", "<s>x</s> y", ""]
    for text in texts:
        for add in (False, True):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), (text, add)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                    ids, skip_special_tokens=skip
                )
        with_bos = ours.encode(text, add_special_tokens=True)
        assert with_bos == [1, *ours.encode(text)]
    ids = ours.encode_chat(CONVERSATIONS[2])
    assert ids == list(ref.apply_chat_template(CONVERSATIONS[2], tokenize=True, return_dict=False))
    assert ids.count(1) == 1  # template BOS only; encode_chat adds no second one


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------

SP_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}user: "
    "{% else %}assistant: {% endif %}{{ m['content'] }} | {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    lines = [f"user: {line} | assistant:" for line in _lines(seed=2) if "😀" not in line]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(d / "tokenizer"),
        vocab_size=120,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=3,
        user_defined_symbols=["<think>", "</think>"],
        minloglevel=2,
    )
    return d


def test_sentencepiece_matches_processor(sp_dir):
    import sentencepiece as spm

    model = sp_dir / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = SentencePieceTokenizer(model)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (sp.bos_id(), (sp.eos_id(),), sp.pad_id())
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 3)
    assert tok.vocab_size == sp.get_piece_size() == 120
    texts = ["the sum of 12 and 345", "café naïve 数学 <think>step</think> done", "  x  y ", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.encode(text, add_special_tokens=True) == [1, *ids]
        assert tok.decode(ids) == sp.decode(ids)
    assert tok.decode(tok.encode(texts[1])) == texts[1]
    assert tok.token_to_id("<think>") == sp.piece_to_id("<think>")
    assert tok.token_to_id("<unk>") == 0 and tok.token_to_id("not-a-piece") is None
    assert tok.id_to_token(1) == "<s>" and tok.id_to_token(120) is None
    # Control pieces written as text map to their ids and survive decode unless skipped.
    ids = tok.encode("<s>the sum</s>")
    assert ids == [1, *sp.encode("the sum"), 2]
    assert tok.decode(ids) == "<s>the sum</s>"
    assert tok.decode(np.asarray(ids), skip_special_tokens=True) == "the sum"


def test_sentencepiece_chat_template(sp_dir):
    tok = SentencePieceTokenizer(sp_dir / "tokenizer.model", chat_template=SP_TEMPLATE)
    messages = [{"role": "user", "content": "sum of 12"}, {"role": "assistant", "content": "x"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<s>user: sum of 12 | assistant: x | assistant:"
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("x | ")
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="no chat template"):
        SentencePieceTokenizer(sp_dir / "tokenizer.model").apply_chat_template(messages)


def test_sentencepiece_from_dir(sp_dir):
    tok = load_tokenizer(sp_dir / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer) and tok.chat_template is None
    (sp_dir / "chat_template.jinja").write_text(SP_TEMPLATE, encoding="utf-8")
    _write_json(sp_dir / "tokenizer_config.json", {"add_bos_token": False})
    _write_json(sp_dir / "generation_config.json", {"eos_token_id": [2, 7]})
    try:
        tok = load_tokenizer(sp_dir)
        assert isinstance(tok, SentencePieceTokenizer)
        assert tok.chat_template == SP_TEMPLATE and tok.eos_ids == (2, 7)
        assert tok.encode("x", add_special_tokens=True) == tok.encode("x")  # add_bos_token=False
    finally:
        for name in ("chat_template.jinja", "tokenizer_config.json", "generation_config.json"):
            os.remove(sp_dir / name)


# ---------------------------------------------------------------------------------------------
# Dispatch and errors
# ---------------------------------------------------------------------------------------------


def test_load_tokenizer_dispatch(bpe_dir, sp_dir, tmp_path):
    assert isinstance(load_tokenizer(bpe_dir), HFTokenizer)
    assert isinstance(load_tokenizer(str(sp_dir)), SentencePieceTokenizer)
    # Both present: tokenizer.json wins.
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (both / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert isinstance(load_tokenizer(both), HFTokenizer)


def test_load_tokenizer_errors(bpe_dir, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"{missing} does not exist"):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ValueError, match=f"no tokenizer in {empty}.*tokenizer.json.*tokenizer.model"
    ):
        load_tokenizer(empty)
    other = tmp_path / "vocab.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="not a tokenizer"):
        load_tokenizer(other)
    with pytest.raises(ValueError, match="tokenizer.json not found"):
        HFTokenizer.from_dir(empty)
    with pytest.raises(ValueError, match="not found"):
        SentencePieceTokenizer(empty / "tokenizer.model")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (bad / "tokenizer_config.json").write_text('{"bos_token": "<s>",', encoding="utf-8")
    with pytest.raises(ValueError, match=f"malformed JSON in {bad / 'tokenizer_config.json'}"):
        load_tokenizer(bad)
    (bad / "tokenizer_config.json").write_text('{"bos_token": 5}', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json: bos_token"):
        load_tokenizer(bad)
    (bad / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    (bad / "generation_config.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(ValueError, match="generation_config.json"):
        load_tokenizer(bad)
    os.remove(bad / "generation_config.json")
    (bad / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=f"cannot load {bad / 'tokenizer.json'}"):
        load_tokenizer(bad)
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.model"):
        load_tokenizer(tmp_path / "broken.model")


def test_shared_fixture_has_no_tokenizer_files(shared_dir):
    d = os.path.join(shared_dir, "fixtures", "tiny-llama-bf16")
    with pytest.raises(ValueError, match="looked for tokenizer.json and tokenizer.model"):
        load_tokenizer(d)
