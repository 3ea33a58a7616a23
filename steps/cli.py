"""`tailwise`: the command line. One subcommand per step, plus store, lineage and demo."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from steps.core.errors import TailwiseError
from steps.core.lineage import FORMATS, downstream, render, upstream
from steps.core.services import OFFLINE_ENV
from steps.core.store import open_store

app = typer.Typer(
    help="tailwise: measure how well each layer of a model is trained (HT-SR weight spectra), "
    "act on it, and audit every artifact it makes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
store_app = typer.Typer(help="Look into and add to the artifact store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
cache_app = typer.Typer(help="List and evict step cache entries.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
console = Console()

StoreOption = Annotated[str | None, typer.Option(
    "--store", envvar="TAILWISE_STORE",
    help="Artifact store: a local directory or s3://bucket/prefix [default: .tailwise/store]")]


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks on errors.")] = False) -> None:
    """Global options (the flag itself is read in main())."""


@app.command()
def lineage(
    ref: Annotated[str, typer.Argument(help="Artifact digest, unique digest prefix or URI.")],
    downstream_: Annotated[bool, typer.Option(
        "--downstream", help="Show what was built from REF instead of what made it.")] = False,
    fmt: Annotated[str, typer.Option("--format", "-f",
                                     help=f"One of: {', '.join(FORMATS)}.")] = "text",
    store: StoreOption = None,
) -> None:
    """Show which steps, params and inputs made an artifact (or what was built from it)."""
    if fmt not in FORMATS:
        raise TailwiseError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    the_store = open_store(store)
    graph = (downstream if downstream_ else upstream)(the_store, ref)
    print(render(graph, fmt))


@store_app.command("ls")
def store_ls(
    kind: Annotated[str | None, typer.Option(help="Only artifacts of this kind.")] = None,
    store: StoreOption = None,
) -> None:
    """List the artifacts in the store."""
    manifests = sorted(open_store(store).list(kind), key=lambda m: m.created_at)
    table = Table("digest", "kind", "name", "size", "made by", "created")
    for m in manifests:
        made = m.produced_by.step if m.produced_by else "-"
        table.add_row(m.digest[:12], m.kind, m.name or "", str(m.size), made, m.created_at)
    console.print(table)


@store_app.command("stat")
def store_stat(ref: Annotated[str, typer.Argument(help="Digest, prefix or URI.")],
               store: StoreOption = None) -> None:
    """Print an artifact's manifest (JSON)."""
    print(open_store(store).stat(ref).to_json().decode())


@store_app.command("get")
def store_get(ref: Annotated[str, typer.Argument(help="Digest, prefix or URI.")],
              dest: Annotated[Path, typer.Argument(help="File (or directory) to write.")],
              store: StoreOption = None) -> None:
    """Download an artifact."""
    print(open_store(store).get(ref, dest))


@store_app.command("put")
def store_put(path: Annotated[Path, typer.Argument(help="File or directory to store.")],
              kind: Annotated[str, typer.Option(help="Artifact kind, e.g. model, text.")],
              store: StoreOption = None) -> None:
    """Add a file or directory (e.g. your own HF model dir) as a source artifact."""
    the_store = open_store(store)
    manifest = the_store.put(path, kind)
    print(json.dumps({"digest": manifest.digest, "uri": the_store.uri(manifest.digest)}))


@cache_app.command("ls")
def cache_ls(step: Annotated[str | None, typer.Option(help="Only this step.")] = None,
             store: StoreOption = None) -> None:
    """List cached step results: cache key, step, outputs, the run that computed them."""
    table = Table("key", "step", "outputs", "flow run", "created")
    entries = sorted(open_store(store).cache_entries(), key=lambda e: e[1].get("created_at", ""))
    for key, entry in entries:
        if step in (None, entry.get("step")):
            outputs = ", ".join(f"{k}={v[:12]}" for k, v in entry.get("outputs", {}).items())
            table.add_row(key[:12], entry.get("step", "?"), outputs,
                          str(entry.get("flow_run_id") or "-"), entry.get("created_at", ""))
    console.print(table)


@cache_app.command("rm")
def cache_rm(keys: Annotated[list[str] | None, typer.Argument(
                 help="Cache keys or unique prefixes.")] = None,
             step: Annotated[str | None, typer.Option(help="Every entry of this step.")] = None,
             all_: Annotated[bool, typer.Option("--all", help="Every entry.")] = False,
             store: StoreOption = None) -> None:
    """Evict cache entries, so the next run recomputes them (artifacts stay in the store)."""
    the_store = open_store(store)
    entries = the_store.cache_entries()
    chosen = {key for key, entry in entries
              if all_ or entry.get("step") == step or any(key.startswith(k) for k in keys or [])}
    if not chosen and not (keys or step or all_):
        raise TailwiseError("cache rm: name cache keys, --step NAME or --all")
    for key in sorted(chosen):
        the_store.cache_delete(key)
    console.print(f"evicted {len(chosen)} cache entr{'y' if len(chosen) == 1 else 'ies'}")


def run_and_report(step_name: str, params: dict, inputs: dict[str, str], store: str | None,
                   use_cache: bool = True, progress: bool = False):
    """Run one step inline (tracked in MLflow) and print its output digests."""
    from steps.core.registry import load_step
    from steps.core.step import run_step
    from steps.core.tracking import open_tracker

    step = load_step(step_name)
    params = step.validate(params)  # before anything is opened or written
    the_store = open_store(store)
    result = run_step(step, params, inputs, store=the_store, tracker=open_tracker(),
                      use_cache=use_cache, progress=progress)
    state = "cached" if result.cached else "computed"
    for name, manifest in result.outputs.items():
        console.print(f"{step_name}.{name}: {manifest.digest}  ({state})", soft_wrap=True)
    return the_store, result


REF_PATTERN = re.compile(r"(sha256:)?[0-9a-f]{4,64}|\w+://.+")


def input_ref(the_store, ref: str, kind: str) -> str:
    """An input given as a path is stored first (a source artifact); else an artifact ref."""
    path = Path(ref)
    if path.exists():
        if kind == "model":
            from steps.core.weights import open_weights

            open_weights(path).infos()  # reads headers only: refuses a corrupt file early
        return the_store.put(path, kind).digest
    if REF_PATTERN.fullmatch(ref):
        return the_store.resolve(ref)
    raise TailwiseError(f"{kind} {ref}: no such file or directory (give a path or an "
                        "artifact digest)")


@app.command()
def spectral(
    model: Annotated[str, typer.Argument(
        help="HF model directory, .safetensors file, sharded index .json, or artifact digest.")],
    estimator: Annotated[str, typer.Option(
        help="ks (WeightWatcher), alpha_peak (AlphaPruning), alpha_peak_corrected, hill "
        "(TempBalance).")] = "ks",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    output: Annotated[Path | None, typer.Option(
        help="Also write the metrics table (Parquet) here.")] = None,
    plots: Annotated[Path | None, typer.Option(help="Also write the plots here.")] = None,
    include: Annotated[list[str] | None, typer.Option(
        help="Regex: analyse only matching matrices (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="Regex: skip matching matrices (repeatable).")] = None,
    conv_slices: Annotated[bool, typer.Option(
        help="One row per conv kernel slice instead of the pooled ESD.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute.")] = False,
    store: StoreOption = None,
) -> None:
    """Measure every weight matrix's eigenvalue spectrum: alpha, norms, rank, warnings."""
    the_store = open_store(store)
    params = {"estimator": estimator, "device": device, "include": include,
              "exclude": exclude, "conv_slices": conv_slices}
    _, result = run_and_report("spectral", params, {"model": input_ref(the_store, model, "model")},
                               store, use_cache=not no_cache, progress=True)
    print_spectral_summary(read_output(the_store, result.outputs["metrics"].digest, output))
    if output:
        console.print(f"metrics: {output}")
    if plots and "plots" in result.outputs:
        the_store.get(result.outputs["plots"].digest, plots)
        for png in sorted(plots.glob("*.png")):
            console.print(f"plot: {png}")


def read_output(the_store, digest: str, output: Path | None = None):
    """A table artifact, also written to `output` when one is given."""
    import pyarrow.parquet as pq

    if output is not None:
        return pq.read_table(the_store.get(digest, output))
    with tempfile.TemporaryDirectory() as scratch:
        return pq.read_table(the_store.get(digest, Path(scratch) / "table.parquet"))


def print_spectral_summary(metrics) -> None:
    from steps.spectral import summarize

    table = Table("layer", "name", "N x M", "alpha", "D", "lambda_max", "log_norm", "warning",
                  title="per-matrix spectral metrics")
    for row in metrics.to_pylist():
        table.add_row(str(row["layer_id"]), row["name"], f"{row['N']} x {row['M']}",
                      f"{row['alpha']:.3f}", f"{row['D']:.3f}", f"{row['lambda_max']:.4g}",
                      f"{row['log_norm']:.3f}", row["warning"] or row["status"])
    console.print(table)
    summary = summarize(metrics)
    console.print(f"{summary['num_fitted']}/{summary['num_matrices']} matrices fitted; mean "
                  f"alpha {summary['mean_alpha']:.3f}, mean alpha_weighted "
                  f"{summary['mean_alpha_weighted']:.3f}; {summary['num_over_trained']} "
                  f"over-trained (alpha < 2), {summary['num_under_trained']} under-trained "
                  f"(alpha > 6)")


@app.command()
def allocate(
    metrics: Annotated[str, typer.Argument(
        help="Per-layer metrics (.parquet or .csv with name + metric columns) or a digest.")],
    policy: Annotated[str, typer.Option(
        help="uniform, alphapruning, owl (sparsity); tempbalance (lr_factor); alphalora "
        "(experts).")] = "alphapruning",
    sparsity: Annotated[float | None, typer.Option(help="Global target sparsity.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="AlphaPruning spread.")] = None,
    metric: Annotated[str | None, typer.Option(help="Metric column [default: alpha].")] = None,
    mode: Annotated[str | None, typer.Option(
        help="reference (the paper's code) or the policy's improved default.")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Any other policy option as KEY=VALUE (repeatable), e.g. "
        "-o total=160 -o beta=2.5.")] = None,
    model: Annotated[str | None, typer.Option(
        help="owl: the dense model whose outlier ratios are measured.")] = None,
    calibration: Annotated[str | None, typer.Option(
        help="owl: calibration text file or digest.")] = None,
    output: Annotated[Path | None, typer.Option(
        help="Also write the decisions table (Parquet) here.")] = None,
    store: StoreOption = None,
) -> None:
    """Turn per-layer metrics into per-layer decisions: sparsity, lr factor or LoRA experts."""
    options = {k: v for k, v in (("sparsity", sparsity), ("epsilon", epsilon),
                                 ("metric", metric), ("mode", mode)) if v is not None}
    options |= key_values(option)
    the_store = open_store(store)
    params = {"policy": policy, "options": options}
    inputs = {"metrics": input_ref(the_store, metrics, "metrics")}
    if model:
        inputs["model"] = input_ref(the_store, model, "model")
    if calibration:
        inputs["calibration"] = input_ref(the_store, calibration, "text")
    _, result = run_and_report("allocate", params, inputs, store)
    print_decisions(read_output(the_store, result.outputs["decisions"].digest, output))


def print_decisions(decisions) -> None:
    column = next(c for c in ("sparsity", "lr_factor", "experts") if c in decisions.column_names)
    table = Table("name", "block", column, title="per-layer decisions")
    for row in decisions.to_pylist():
        value = row[column]
        table.add_row(row["name"], str(row.get("block")),
                      f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="HF causal LM directory or artifact digest.")],
    method: Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt.")] = "wanda",
    sparsity: Annotated[float | None, typer.Option(
        help="One global sparsity (or give --allocation).")] = None,
    allocation: Annotated[str | None, typer.Option(
        help="Per-layer sparsity: a decisions table from `tailwise allocate` or a digest.")
    ] = None,
    nm: Annotated[str | None, typer.Option(help="N:M structured sparsity, e.g. 2:4.")] = None,
    calibration: Annotated[str | None, typer.Option(
        help="Calibration text file or digest (Wanda, SparseGPT).")] = None,
    nsamples: Annotated[int, typer.Option(help="Calibration sequences.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 2048,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_tokens: Annotated[int | None, typer.Option(
        help="Calibration tokens per block call (whole sequences) [default: 512].")] = None,
    compressed: Annotated[bool, typer.Option(
        help="Store the pruned weights as a bitmask and the kept values.")] = False,
    output: Annotated[Path | None, typer.Option(help="Write the pruned model here.")] = None,
    store: StoreOption = None,
) -> None:
    """Prune a causal LM's decoder blocks (magnitude, Wanda, SparseGPT), globally or per layer."""
    the_store = open_store(store)
    inputs = {"model": input_ref(the_store, model, "model")}
    if allocation:
        inputs["allocation"] = input_ref(the_store, allocation, "decisions")
    if calibration:
        inputs["calibration"] = input_ref(the_store, calibration, "text")
    params = {"method": method, "sparsity": sparsity, "nm": nm, "nsamples": nsamples,
              "seqlen": seqlen, "device": device, "compressed": compressed}
    if batch_tokens is not None:
        params["batch_tokens"] = batch_tokens
    _, result = run_and_report("prune", params, inputs, store)
    if output:
        print(the_store.get(result.outputs["model"].digest, output))


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Model directory or artifact digest.")],
    perplexity: Annotated[str | None, typer.Option(
        help="Text file or digest: perplexity over non-overlapping windows.")] = None,
    data: Annotated[str | None, typer.Option(
        help="Labelled JSONL (or digest): accuracy of a fine-tuned classifier on its test "
        "split.")] = None,
    seqlen: Annotated[int | None, typer.Option(
        help="Window length [default: the model's context].")] = None,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first windows.")
                           ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    store: StoreOption = None,
) -> None:
    """Perplexity (or a classifier's accuracy), sparsity, parameter count and size on disk."""
    the_store = open_store(store)
    inputs = {"model": input_ref(the_store, model, "model")}
    if perplexity:
        inputs["text"] = input_ref(the_store, perplexity, "text")
    if data:
        inputs["data"] = input_ref(the_store, data, "text-classification")
    params = {"seqlen": seqlen, "max_windows": max_windows, "device": device,
              "name": Path(model).name}
    _, result = run_and_report("evaluate", params, inputs, store)
    evaluation = read_output(the_store, result.outputs["evaluation"].digest)
    for key, value in evaluation.to_pylist()[0].items():
        console.print(f"{key:>16}: {value}")


BUILT_IN_MODELS = ("tiny-gpt2", "tiny-llama", "minilm", "smollm2")
BUILT_IN_DATA = ("fortunes", "kjv-testament")


@app.command()
def finetune(
    model: Annotated[str, typer.Argument(
        help="HF encoder or causal LM directory, artifact digest, or a built-in name "
        f"({', '.join(BUILT_IN_MODELS)}).")],
    data: Annotated[str, typer.Option(
        help="Text-classification JSONL (text, label [, split] per line), a digest, or a "
        f"built-in set ({', '.join(BUILT_IN_DATA)}).")],
    fraction: Annotated[float, typer.Option(
        help="Share of the training split to use (seeded, stratified).")] = 1.0,
    tempbalance: Annotated[str, typer.Option(
        help="none, linear (TB) or sigmoid (TB_Sigmoid, the low-data fine-tuning rule).")
    ] = "none",
    lora: Annotated[int | None, typer.Option(help="LoRA rank r [default: full fine-tuning].")
                    ] = None,
    experts: Annotated[str | None, typer.Option(
        help="AlphaLoRA: a decisions table with an experts column (tailwise allocate "
        "--policy alphalora), or a digest.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of subset, head, shuffling, dropout.")] = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-5,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 128,
    max_train_examples: Annotated[int | None, typer.Option(
        help="Cap the training split before taking the fraction.")] = None,
    max_eval_examples: Annotated[int | None, typer.Option(
        help="Cap validation and test.")] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="Any other step param as KEY=VALUE (repeatable), e.g. "
        "-o tb_low=0.7 -o weight_decay=0.01.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    output: Annotated[Path | None, typer.Option(
        help="Write the fine-tuned model (and adapter, history, metrics) here.")] = None,
    store: StoreOption = None,
) -> None:
    """Fine-tune a text classifier: full or LoRA, optional TempBalance, on a low-data subset."""
    params = {"fraction": fraction, "tempbalance": tempbalance, "lora": lora, "epochs": epochs,
              "seed": seed, "lr": lr, "optimizer": optimizer, "batch_size": batch_size,
              "max_length": max_length, "max_train_examples": max_train_examples,
              "max_eval_examples": max_eval_examples, "device": device}
    params |= key_values(option)
    from steps.core.registry import load_step

    load_step("finetune").validate(params)  # bad params fail before anything is stored
    the_store = open_store(store)
    if model in BUILT_IN_MODELS and not Path(model).exists():
        _, built = run_and_report("build_model", {"name": model}, {}, store)
        inputs = {"model": built.outputs["model"].digest}
    else:
        inputs = {"model": input_ref(the_store, model, "model")}
    if data in BUILT_IN_DATA and not Path(data).exists():
        params["dataset"] = data
    else:
        inputs["data"] = input_ref(the_store, data, "text-classification")
    if experts:
        inputs["experts"] = input_ref(the_store, experts, "decisions")
    _, result = run_and_report("finetune", params, inputs, store)
    with tempfile.TemporaryDirectory() as scratch:
        path = the_store.get(result.outputs["metrics"].digest, Path(scratch) / "metrics.json")
        for key, value in json.loads(path.read_text()).items():
            console.print(f"{key:>16}: {value:.4f}" if isinstance(value, float)
                          else f"{key:>16}: {value}")
    if output:
        for name in ("model", "adapter", "history", "metrics", "subset", "plots"):
            if name in result.outputs:
                suffix = {"history": ".parquet", "metrics": ".json", "subset": ".json"}
                dest = output / f"{name}{suffix.get(name, '')}"
                if name == "adapter" and not result.outputs[name].is_dir:
                    dest = output / "adapter.safetensors"
                the_store.get(result.outputs[name].digest, dest)
        console.print(f"written to {output}")


def key_values(items: list[str] | None) -> dict:
    """KEY=VALUE options; numbers and true/false become JSON values."""
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise TailwiseError(f"--option {item!r}: expected KEY=VALUE")
        values[key] = json.loads(value) if re.fullmatch(r"[-+\d.eE]+|true|false|null", value) \
            else value
    return values


@app.command()
def diagnose(
    model: Annotated[str, typer.Argument(
        help="Trained plain model (mlp / cnn) directory or artifact digest.")],
    data: Annotated[str, typer.Option(
        help="The scikit-learn set it was trained on: digits, iris, wine, breast_cancer.")
    ] = "digits",
    model_b: Annotated[str | None, typer.Option(
        help="The same configuration trained from another seed: connectivity and CKA.")
    ] = None,
    tree: Annotated[str | None, typer.Option(
        help="A fitted MD tree (JSON file or digest, e.g. from the model_zoo flow).")] = None,
    question: Annotated[str | None, typer.Option(
        help="bs_failure, width_vs_batch or data_vs_batch (checked against the tree).")
    ] = None,
    fraction: Annotated[float, typer.Option(
        help="Share of the training split the model was trained on.")] = 1.0,
    data_seed: Annotated[int, typer.Option(help="Seed of that training subset.")] = 0,
    trace_probes: Annotated[int, typer.Option(help="Hutchinson probes.")] = 32,
    curve_epochs: Annotated[int, typer.Option(help="Epochs training the Bezier bend.")] = 10,
    store: StoreOption = None,
) -> None:
    """Loss-landscape features of a trained classifier and, with a tree, its diagnosis."""
    the_store = open_store(store)
    inputs = {"model": input_ref(the_store, model, "model")}
    if model_b:
        inputs["model_b"] = input_ref(the_store, model_b, "model")
    if tree:
        inputs["tree"] = input_ref(the_store, tree, "md-tree")
    params = {"dataset": data, "question": question, "fraction": fraction,
              "data_seed": data_seed, "trace_probes": trace_probes,
              "curve_epochs": curve_epochs}
    _, result = run_and_report("diagnose", params, inputs, store)
    if "diagnosis" not in result.outputs:
        features = read_output(the_store, result.outputs["features"].digest)
        for key, value in features.to_pylist()[0].items():
            console.print(f"{key:>24}: {value}")
        return
    with tempfile.TemporaryDirectory() as scratch:
        found = json.loads(the_store.get(result.outputs["diagnosis"].digest,
                                         Path(scratch) / "diagnosis.json").read_text())
    console.print(f"{found['question']}: [bold]{found['answer']}[/bold]")
    for step in found["path"]:
        console.print(f"  {step['text']}")
    for key, value in found["features"].items():
        console.print(f"{key:>24}: {value}")


@app.command()
def model(
    name: Annotated[str, typer.Argument(
        help="tiny-gpt2, tiny-llama, cnn, mlp (seeded random) or minilm, smollm2 (pretrained, "
        "shipped by PyPI packages).")],
    seed: Annotated[int, typer.Option(help="Seed of the tiny random models.")] = 0,
    output: Annotated[Path | None, typer.Option(
        help="Also write the model directory here.")] = None,
    store: StoreOption = None,
) -> None:
    """Build a model and store it as an artifact (an HF directory with safetensors)."""
    the_store, result = run_and_report("build_model", {"name": name, "seed": seed}, {}, store)
    if output is not None:
        print(the_store.get(result.outputs["model"].digest, output))


@app.command()
def demo(
    model_name: Annotated[str, typer.Option("--model", help="Model to build.")] = "tiny-gpt2",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute every step.")] = False,
    store: StoreOption = None,
) -> None:
    """Run the demo flow on the embedded default (no servers) and say where to look."""
    # Prefect's ephemeral API server can take longer than its 20 s default on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.common import RunSettings
    from flows.demo import DemoParams
    from flows.demo import demo as demo_flow

    results = demo_flow(DemoParams(model=model_name),
                        RunSettings(store=store, use_cache=not no_cache))
    report_demo(results, open_store(store))


def report_demo(results: dict, the_store) -> None:
    console.rule("demo finished")
    console.print(f"artifact store : {results['store']}")
    console.print(f"MLflow         : parent run {results['parent_run_id']} "
                  f"in {results['tracking_uri']}")
    if str(results["tracking_uri"]).startswith("sqlite:"):
        console.print(f"                 browse: mlflow ui --backend-store-uri "
                      f"{results['tracking_uri']}")
    for step_name in ("build_model", "spectral"):
        result = results[step_name]
        state = "cached" if result.cached else "computed"
        for name, manifest in result.outputs.items():
            console.print(f"{step_name:>11}.{name:<3}: {manifest.digest}  ({state})",
                          soft_wrap=True)
    plots = results["spectral"].outputs.get("plots")
    if plots is not None:
        folder = Path(".tailwise") / "demo" / f"plots-{plots.digest[:12]}"
        the_store.get(plots.digest, folder)
        for png in sorted(folder.glob("*.png")):
            console.print(f"plot           : {png}")
    metrics = results["spectral"].outputs["metrics"].digest
    console.print(f"audit it       : tailwise lineage {metrics[:12]}", soft_wrap=True)


def main() -> None:
    """Entry point: user errors print one line and exit 2; `--debug` shows the traceback."""
    debug = "--debug" in sys.argv[1:]
    for key, value in OFFLINE_ENV.items():  # no telemetry, no hub downloads
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its database chatter
    try:
        app(standalone_mode=True)
    except TailwiseError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
