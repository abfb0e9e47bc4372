"""The ``edgekit`` command: thin subcommands over the edgekit Python API."""

from __future__ import annotations

import argparse
import json
import sys

from tools._console import OneLineParser, quiet_native_logs, run

QUANTIZE_CHOICES = ("none", "dynamic", "float16", "int8", "qat")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="edgekit", description="Compress, export and verify Keras models for edge devices.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    c = sub.add_parser("compress", help="prune/quantize/distill a Keras model into verified TFLite/ONNX",
                       description="Compress MODEL into verified artifacts in --out. With no technique flag: "
                                   "post-training int8. With --max-accuracy-drop and no technique flag: try "
                                   "candidate recipes and keep the smallest within the budget.")
    c.add_argument("model", help="SavedModel folder, .h5, or .keras (tf-keras or Keras 3)")
    c.add_argument("--data", default="digits", help="'digits' (embedded) or an .npz with x and y (default: digits)")
    c.add_argument("--eval-data", help="an .npz to evaluate on instead of a split of --data")
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--prune", type=float, metavar="S", help="magnitude pruning to sparsity S, e.g. 0.75")
    c.add_argument("--structured", metavar="M:N", help="structured sparsity; 2:4 is supported")
    c.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="quantization (default: int8 alone, none when combined with another technique)")
    c.add_argument("--int8-io", action="store_true", help="int8 inputs/outputs for int8/qat TFLite models")
    students = c.add_mutually_exclusive_group()
    students.add_argument("--student-width", type=float, metavar="W", help="distill into a copy W times as wide")
    students.add_argument("--student", metavar="FILE", help="distill into this Keras model")
    c.add_argument("--formats", default="tflite,onnx", help="comma-separated: tflite,onnx (default: both)")
    c.add_argument("--max-accuracy-drop", type=float, metavar="P", help="accuracy budget in points")
    c.add_argument("--select-by", choices=("gzip_bytes", "bytes"), default="gzip_bytes",
                   help="size the budget search minimises (default: gzip_bytes)")
    c.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs for pruning/QAT (default 4)")
    c.add_argument("--distill-epochs", type=int, default=12, help="distillation epochs (default 12)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compress)

    t = sub.add_parser("trainable", help="export a trainable TFLite artifact for on-device training",
                       description="Write DIR/trainable.tflite (train/infer/get_weights/set_weights signatures, "
                                   "builtin ops only, initialised with MODEL's weights) and DIR/manifest.json.")
    t.add_argument("model", help="SavedModel folder, .h5, or .keras (tf-keras or Keras 3)")
    t.add_argument("--out", required=True, help="output folder (written atomically)")
    t.add_argument("--head-only", action="store_true",
                   help="train only the head; the backbone becomes an int8 backbone.tflite")
    t.add_argument("--batch-size", type=int, default=32, help="fixed batch of the train signature (default 32)")
    t.add_argument("--learning-rate", type=float, default=0.05, help="suggested learning rate for devices")
    t.add_argument("--data", default="digits", help="samples for verification and int8 calibration")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_trainable)

    fl = sub.add_parser("fl", help="federated learning with Flower")
    fl_sub = fl.add_subparsers(dest="fl_command", parser_class=OneLineParser)
    sim = fl_sub.add_parser("simulate", help="a federated run in Flower's simulation engine (Ray), one machine",
                            description="Each virtual client trains the trainable TFLite artifact in LiteRT on its "
                                        "own seeded partition; the server aggregates with a Flower strategy, "
                                        "evaluates on held-out data every round and checkpoints.")
    sim.add_argument("--model", required=True, help="a Keras model (trained or never trained)")
    sim.add_argument("--data", default="digits", help="'digits' or an .npz with x and y")
    sim.add_argument("--clients", type=int, default=10)
    sim.add_argument("--rounds", type=int, default=5)
    sim.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (default iid)")
    sim.add_argument("--out", required=True)
    sim.add_argument("--strategy", default="fedavg", choices=("fedavg", "fedprox", "trimmed"))
    sim.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx mu (default 0.01)")
    sim.add_argument("--local-epochs", type=int, default=1)
    sim.add_argument("--learning-rate", type=float, default=0.05)
    sim.add_argument("--batch-size", type=int, default=16, help="on-device batch size (default 16)")
    sim.add_argument("--fraction", type=float, default=1.0, help="fraction of clients sampled per round")
    sim.add_argument("--min-fraction", type=float, default=0.5,
                     help="a round needs valid updates from this fraction of the sampled clients")
    sim.add_argument("--compress-updates", action="store_true", help="clients send int8 weight deltas")
    sim.add_argument("--dp-noise", type=float, metavar="SIGMA",
                     help="differential privacy: client-side clipping + Gaussian noise with this multiplier")
    sim.add_argument("--dp-clip", type=float, default=1.0, help="L2 clipping norm of each update (default 1.0)")
    sim.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the reported (epsilon, delta)")
    sim.add_argument("--secagg", action="store_true",
                     help="secure aggregation (SecAgg+): the server sees only the sum of the masked updates")
    sim.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--quiet", action="store_true")
    sim.set_defaults(func=cmd_fl_simulate)

    dep = fl_sub.add_parser("up", help="a real federation here: flower-superlink + N flower-supernode, TLS",
                            description="Start a SuperLink and one SuperNode per client on 127.0.0.1 (TLS with a "
                                        "generated CA unless --insecure), run the federation with flwr run, stop "
                                        "every process, and compress the final global model.")
    dep.add_argument("--model", required=True)
    dep.add_argument("--data", default="digits")
    dep.add_argument("--clients", type=int, default=2)
    dep.add_argument("--rounds", type=int, default=3)
    dep.add_argument("--partition", default="iid")
    dep.add_argument("--out", required=True)
    dep.add_argument("--strategy", default="fedavg", choices=("fedavg", "fedprox", "trimmed"))
    dep.add_argument("--local-epochs", type=int, default=1)
    dep.add_argument("--learning-rate", type=float, default=0.05)
    dep.add_argument("--compress-updates", action="store_true")
    dep.add_argument("--insecure", action="store_true", help="no TLS (only when asked)")
    dep.add_argument("--no-node-auth", action="store_true",
                     help="do not register SuperNode key pairs (by default each SuperNode gets an ECDSA key)")
    dep.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    dep.add_argument("--quiet", action="store_true")
    dep.set_defaults(func=cmd_fl_up)

    i = sub.add_parser("inspect", help="ops, sizes and quantization of an artifact; check a folder's manifest")
    i.add_argument("target", help="a .tflite/.onnx file or an edgekit output folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)
    return parser


def cmd_compress(args: argparse.Namespace) -> int:
    import edgekit
    from edgekit.report import format_table

    technique = any(v is not None for v in (args.prune, args.structured, args.student_width, args.student))
    recipe = None
    if technique or args.quantize is not None:
        recipe = edgekit.Recipe(prune=args.prune, structured=args.structured,
                                quantize=args.quantize or ("none" if technique else "int8"),
                                student_width=args.student_width, student=args.student)
    config = edgekit.CompressConfig(
        recipe=recipe, formats=args.formats, max_accuracy_drop=args.max_accuracy_drop, int8_io=args.int8_io,
        select_by=args.select_by, seed=args.seed,
        training=edgekit.TrainingConfig(finetune_epochs=args.epochs, distill_epochs=args.distill_epochs,
                                        batch_size=args.batch_size))
    result = edgekit.compress(args.model, args.data, args.out, config=config, eval_data=args.eval_data,
                              progress=not args.quiet)
    print(f"source: {result.source['path']}  accuracy {result.source['accuracy']:.2f}%  "
          f"params {result.source['params']:,}")
    print(format_table(result))
    files = ", ".join(f"{a.filename} ({a.bytes:,} bytes)" for a in result.selected.artifacts)
    print(f"wrote {result.out}: {files}, manifest.json, report.md")
    return 0


def cmd_trainable(args: argparse.Namespace) -> int:
    import edgekit

    config = edgekit.TrainableConfig(head_only=args.head_only, batch_size=args.batch_size,
                                     learning_rate=args.learning_rate)
    result = edgekit.export_trainable(args.model, args.out, data=args.data, config=config, progress=not args.quiet)
    spec, check = result.manifest["trainable"], result.manifest["verification"]
    print(f"trainable ({spec['mode']}): {len(spec['tensors'])} tensors, batch {spec['batch_size']}, "
          f"{sum(int(__import__('math').prod(t['shape'])) for t in spec['tensors']):,} trainable weights")
    print(f"verified in {check['runtime']}: infer max abs diff {check['infer_max_abs_diff']:.2g}, "
          f"one train step vs TensorFlow max abs diff {check['train_step_max_abs_diff']:.2g}")
    files = ", ".join(f"{name} ({len(data):,} bytes)" for name, data in result.files.items())
    print(f"wrote {result.out}: {files}, manifest.json")
    return 0


def cmd_fl_simulate(args: argparse.Namespace) -> int:
    from edgekit.federated.server_app import RoundSettings
    from edgekit.federated.simulate import SimulationConfig, simulate

    rounds = RoundSettings(rounds=args.rounds, local_epochs=args.local_epochs, learning_rate=args.learning_rate,
                           strategy=args.strategy, proximal_mu=args.proximal_mu, fraction=args.fraction,
                           min_fraction=args.min_fraction, compress_updates=args.compress_updates, seed=args.seed,
                           dp_noise_multiplier=args.dp_noise, dp_clipping_norm=args.dp_clip, dp_delta=args.dp_delta)
    config = SimulationConfig(clients=args.clients, partition=args.partition, rounds=rounds,
                              batch_size=args.batch_size, resume=args.resume, secure_aggregation=args.secagg)
    result = simulate(args.model, args.data, args.out, config=config, progress=not args.quiet,
                      log=lambda line: print(line, flush=True))
    print(f"wrote {result.out}: history.json, accuracy.png, checkpoints/, final/ (int8 model.tflite + manifest)")
    return 0


def cmd_fl_up(args: argparse.Namespace) -> int:
    from edgekit.federated.deploy import DeployConfig, up
    from edgekit.federated.server_app import RoundSettings

    rounds = RoundSettings(rounds=args.rounds, local_epochs=args.local_epochs, learning_rate=args.learning_rate,
                           strategy=args.strategy, compress_updates=args.compress_updates)
    config = DeployConfig(clients=args.clients, partition=args.partition, rounds=rounds, insecure=args.insecure,
                          node_auth=not args.no_node_auth, timeout=args.timeout)
    result = up(args.model, args.data, args.out, config=config, progress=not args.quiet,
                log=lambda line: print(line, flush=True))
    print(f"wrote {result.out}: history.json, accuracy.png, certs/, logs/, final/ (int8 model.tflite + manifest)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgekit.inspect import format_inspection, inspect_artifact

    info = inspect_artifact(args.target)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0 if info.get("manifest_ok") is not False else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from edgekit._version import __version__

        print(f"edgekit {__version__}")
        return 0
    if args.command == "fl" and not getattr(args, "fl_command", None):
        parser.parse_args(["fl", "--help"])  # prints the fl subcommands and exits
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    quiet_native_logs()
    from edgekit.errors import EdgeKitError

    return run("edgekit", lambda: args.func(args), (EdgeKitError,))


if __name__ == "__main__":
    sys.exit(main())
