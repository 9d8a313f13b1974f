"""TRL's own GRPOTrainer, with AgentOS generating the rollouts.

The trainer is TRL's `GRPOTrainer`, unchanged: its dataset, reward function, loss and
optimizer. AgentOS only samples: `rollout_func(backend)` prefills each prompt once, forks
it `num_generations` ways, and pushes the trainer's weights to the engine whenever the
optimizer step changes. At the end the engine's greedy tokens are compared with the
trainer model's own greedy `generate`: equal when the weights really were synced.

The model is a small random Llama written with `save_pretrained` (and a byte-level BPE
tokenizer with a chat template) unless --model names an HF folder of your own. The task:
answer with vowels; the reward of a completion is the fraction of its letters that are
vowels.

    pip install "agentos[trl]"
    python examples/trl_grpo.py --steps 3                    # in-process engine
    agentos serve --model /tmp/m --allow-open-admin &        # or against a server
    python examples/trl_grpo.py --model /tmp/m --url http://127.0.0.1:8000

A server whose weights it pushes must allow it: `--allow-open-admin` on a loopback server
without keys, or an admin key in AGENTOS_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

PROMPTS = ["Say something.", "Answer the question.", "What is in the box?", "Sing a song."]
GREEDY_TOKENS = 8
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def vowel_reward(completions, **kwargs) -> list[float]:
    """Per completion: the fraction of its letters that are vowels."""
    rewards = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        letters = [ch for ch in text.lower() if ch.isalpha()]
        rewards.append(sum(ch in "aeiou" for ch in letters) / max(1, len(letters)))
    return rewards


def make_model(folder: Path, seed: int = 0) -> Path:
    """A small random Llama and a byte-level BPE tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(PROMPTS + ["aeiou " * 8, "<user><assistant>"], trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="an HF folder (default: a small random Llama)")
    p.add_argument("--url", default=None, help="an `agentos serve` of the same model")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--text", action="store_true", help="plain-text prompts, not chat")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    from trl import GRPOConfig, GRPOTrainer

    from agentos import Client, Engine, SamplingParams
    from agentos.integrations.trl import prompt_ids, rollout_func

    logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else make_model(Path(tmp) / "model")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        prompts = PROMPTS if args.text else [[{"role": "user", "content": q}] for q in PROMPTS]
        backend = Client(args.url) if args.url else Engine(model=str(folder))
        rollouts = rollout_func(backend)
        config = GRPOConfig(
            output_dir=str(Path(tmp) / "out"), max_steps=args.steps, learning_rate=args.lr,
            per_device_train_batch_size=2 * args.num_generations,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length, temperature=1.0, beta=0.0,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
            seed=0, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=vowel_reward, args=config,
                              train_dataset=Dataset.from_dict({"prompt": prompts * 8}),
                              processing_class=tokenizer, rollout_func=rollouts)
        ids = [prompt_ids(trainer, q) for q in prompts]
        before = [greedy(model, i, tokenizer.pad_token_id) for i in ids]
        trainer.train()
        rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]

        # the trained weights, once more (the last step's update came after the last rollout)
        rollouts.push_weights(trainer)
        trained = trainer.accelerator.unwrap_model(trainer.model).eval()
        checks, changed = [], 0
        for i, old in zip(ids, before):
            theirs = greedy(trained, i, tokenizer.pad_token_id)
            s = backend.create_session(tokens=i)
            ours = s.generate(params=SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0,
                                                    ignore_eos=True)).tokens
            s.close()
            checks.append(ours == theirs)
            changed += theirs != old
        result = {"steps": trainer.state.global_step, "mean_reward_per_step": rewards,
                  "weight_pushes": [(v.step, v.version, round(v.seconds, 4))
                                    for v in rollouts.versions],
                  "greedy_equal": all(checks), "prompts_checked": len(checks),
                  # the check means something only where training changed the answer
                  "greedy_changed_by_training": changed}
        backend.close()
    for i, r in enumerate(rewards, 1):
        print(f"step {i}: mean reward {r:.3f}")
    print(f"weights pushed (step, version, s): {result['weight_pushes']}")
    print(f"AgentOS greedy tokens equal the trained model's: {result['greedy_equal']} "
          f"({len(checks)} prompts, {changed} of them answered otherwise before training)")
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    return 0 if result["greedy_equal"] and result["steps"] >= args.steps else 1


def greedy(model, ids: list[int], pad_token_id: int) -> list[int]:
    """The model's own greedy continuation (transformers' generate, no early stop)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), do_sample=False, max_new_tokens=GREEDY_TOKENS,
                             min_new_tokens=GREEDY_TOKENS, pad_token_id=pad_token_id)
    return out[0, len(ids):].tolist()


if __name__ == "__main__":
    sys.exit(main())
