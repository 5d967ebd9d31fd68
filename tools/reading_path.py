"""How long is the reading path? The functions and classes a reader must read to follow a run from
train.run to the LoRA forward, with their non-blank line counts (comments and docstrings included),
speed (fast.py) set aside.

    python tools/reading_path.py          # a table, file by file, and the total

The list is written out below, by hand, as a reader would follow the calls: what a run does (train.run
and the helpers it calls for data, model and settings), each training phase (feddpa, fed, the run
folder's checkpoint hook), the LoRA layer and its scopes, evaluation and decoding, and the model. Not
on it: error checking of files (hf, data's parsers), the built-in world, tables and plots, extras.
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PATH = {  # file: the top-level names (functions, classes, assignments) on the path, in reading order
    "train.py": ["run", "open_run", "recipe", "load_data", "base_and_tokenizer", "load_model", "choose_device"],
    "feddpa.py": ["Method", "MIXINGS", "METHODS", "Recipe", "mix",
                  "fedit_step", "fresh_local", "feddpa_t_step", "local_step", "PhaseSpec", "PHASES", "phases_of", "Phase",
                  "scaled", "phase_schedule", "setup_phase", "phase_result", "run_phase", "prompt_batches", "represent", "draw_references", "reference_reps",
                  "precise", "similarity", "dynamic_lambda", "paper_weight", "PaperWeight"],
    "fed.py": ["LocalTrain", "Diverged", "train_adapter", "Client", "Update", "fedavg", "averaging", "nbytes", "sample_clients",
               "seeded", "Federation", "in_process", "NoReplies", "run_rounds"],
    "runs.py": ["run_phase"],
    "lora.py": ["ADAPTERS", "TARGETS", "Dropout", "LoRALinear", "inject", "lora_layers", "set_trainable", "_swapped",
                "mixed", "using", "training", "adapter_tensors", "get_adapter", "check_adapter", "load_adapter"],
    "evaluation.py": ["rouge_tokens", "f1", "rouge1", "rouge_l", "exact_match", "score", "Decode", "Evaluator", "EvalClient", "answer",
                      "represented", "lambdas", "answer_dynamic", "scores_by_task", "global_source", "answer_key",
                      "answer_keys", "answers_needed", "FIXED_MIXES", "evaluate_client", "evaluate_method", "summarize",
                      "p_and_ttp"],
    "generate.py": ["KVCache", "next_logits", "generate", "greedy", "beam_search"],
    "model.py": ["ModelConfig", "IGNORE_INDEX", "RMSNorm", "rope_tables", "apply_rope", "Context", "Attention", "MLP",
                 "Block", "Decoder", "Llama"],
    "data.py": ["format_prompt", "encode_example", "encode_clients", "encode_prompt", "pad_left", "collate"],
}


def spans(path: Path) -> dict:
    """{top-level name: non-blank lines of its definition, decorators included}."""
    lines = path.read_text().split("\n")
    out = {}
    for node in ast.parse(path.read_text()).body:
        names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                 [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)])
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for name in names:
            out[name] = sum(1 for line in lines[start - 1:node.end_lineno] if line.strip())
    return out


def main():
    total, missing = 0, []
    for file, names in PATH.items():
        found = spans(ROOT / file)
        counted = {n: found[n] for n in names if n in found}
        missing += [f"{file}:{n}" for n in names if n not in found]
        total += sum(counted.values())
        print(f"{file:14} {sum(counted.values()):5}  " + ", ".join(f"{n} {c}" for n, c in counted.items()))
    print(f"{'total':14} {total:5}")
    if missing:
        print("not found (renamed or removed? update PATH): " + ", ".join(missing), file=sys.stderr)


if __name__ == "__main__":
    main()
