"""Write a tiny random Llama (2 layers, hidden 64, word-level tokenizer) and a 2-prompt JSONL into a folder.

Used by .ci/wheel_smoke.sh to run the installed CLI end to end without downloading a model.
"""

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

VOCAB = 64


def main(out: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out / "model")
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t2", pad_token="t2").save_pretrained(out / "model")
    rows = [{"question_id": i, "category": "smoke", "prompt": " ".join(f"t{3 + (i + j) % 9}" for j in range(24))}
            for i in range(2)]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
