"""Tiny models for tests: a byte-level BPE tokenizer trained in memory and causal LMs / NLI models
built from small configs, saved to a folder so tests load them through ka2l's real loaders."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is the capital of France? Paris.",
    "What is the capital of Italy? Rome.",
    "What is the capital of Spain? Madrid.",
    "Who wrote Hamlet? William Shakespeare.",
    "Answer the following question as briefly as possible.",
    "Question: what is the chemical symbol of gold? Answer: Au",
    "The quick brown fox jumps over the lazy dog.",
    "premise hypothesis entailment neutral contradiction",
] * 20


def make_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<|im_start|>", "<|im_end|>", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llama(folder: Path, chat: bool = True, seed: int = 0, layers: int = 2) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(chat)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_nli(folder: Path, label_order=("contradiction", "neutral", "entailment"), seed: int = 0) -> Path:
    """A DeBERTa-v2 sequence classifier with 3 labels in ``label_order`` (random weights)."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = make_tokenizer(chat=False)
    tok.cls_token, tok.sep_token = "[CLS]", "[SEP]"
    torch.manual_seed(seed)
    cfg = DebertaV2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=len(tok),
        max_position_embeddings=128, num_labels=3, id2label=dict(enumerate(label_order)),
        label2id={l: i for i, l in enumerate(label_order)}, pad_token_id=tok.pad_token_id,
    )
    DebertaV2ForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_memorising_llama(folder: Path, known: list[tuple[str, str]], steps: int = 150, seed: int = 0) -> Path:
    """A tiny chat Llama trained to answer the ``known`` questions (through ka2l's own prompt), so
    those get consistent answers (low SE) while unseen questions get random ones (high SE)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ka2l.config import PromptConfig
    from ka2l.models.llm import build_prompt

    tok = make_tokenizer(chat=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                      vocab_size=len(tok), max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    texts = [build_prompt(tok, q, PromptConfig()) + a + tok.eos_token for q, a in known]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_t5(folder: Path, seed: int = 0) -> Path:
    """A two-layer T5 built from config over the tiny tokenizer (the offline stand-in for t5-base)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = make_tokenizer(chat=False)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
