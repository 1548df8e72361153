"""Two tiny tokenizers built in code that split the same text differently (no downloads): a
GPT-2-style byte-level BPE and a Gemma-style "▁" BPE with byte fallback, and a tiny Llama that
speaks one of them (tests of ensemblekd.crosstok and of teachers with their own tokenizer)."""

import json

CORPUS = ["Le café est fermé depuis déjà trois ans.", "Über die Brücke gehen naïve Touristen.",
          "The quick brown fox jumps over the lazy dog.", "A café, a résumé, a naïve fiancé."] * 3
TEXTS = ["Un café 🎉 très  naïve,\n\nüber 東京 👍🏽 ok.",
         "🎉Le résumé: déjà vu!\tThe fox 📸📸 jumps.",
         "  leading spaces, and a trailing one ",
         "é",
         "plain ascii text"]


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<|endoftext|>"], show_progress=False))
    return tok


def metaspace_tokenizer(vocab_size: int = 150, extra=()):
    """Gemma-style: " " -> "▁" by the normaliser, BPE with <0x00>..<0xFF> byte-fallback ids first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Replace(" ", "▁")
    base.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=40, show_progress=False))
    spec = json.loads(base.to_str())["model"]
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for piece in [*sorted(spec["vocab"], key=spec["vocab"].get), *extra]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True))
    tok.normalizer, tok.pre_tokenizer = base.normalizer, base.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<pad>", "<bos>"])
    tok.add_tokens(["\n\n"])
    return tok


def fast_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok)




def tiny_llama_dir(out, tokenizer, seed: int = 0):
    """A 1-block Llama with random weights over `tokenizer`'s vocabulary, saved with the tokenizer
    (a directory kind huggingface loads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
