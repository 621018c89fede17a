"""
A tiny stand-in for a pretrained DeepSeek-LLM model, for tests/test_hf_job.sh and the
README's worked example: a byte-level BPE tokenizer trained on a text file with
DeepSeek's BOS and EOS tokens (added in front of every text as DeepSeek's tokenizer does),
and a LlamaForCausalLM of its vocabulary, saved the way the Hub's models are.

    /usr/bin/python3 tests/make_tiny_hf.py OUT_DIR TEXT_FILE

Needs transformers (and the tokenizers package it brings).
"""
import json
import os
import sys

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek-LLM's


def main():
    out, text = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([text], trainers.BpeTrainer(vocab_size=1024, special_tokens=[BOS, EOS],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
                   "tokenizer_class": "LlamaTokenizerFast", "model_max_length": 4096,
                   "clean_up_tokenization_spaces": False}, f, indent=2)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=172,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                      bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS))
    transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    print(f"{out}: LlamaForCausalLM, vocabulary {config.vocab_size}, BOS {config.bos_token_id}")


if __name__ == "__main__":
    main()
