"""The ``edgekit`` command: thin subcommands over the edgekit Python API.

Choices and defaults are read from the library's enums, registries and dataclasses, never restated.
The command line parses its own small syntaxes (``2:4``, ``dirichlet:0.5``, ``tflite,onnx``) into them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields

from device_agents.console import OneLineParser, quiet_native_logs, run
from device_agents.exit_codes import ExitCode
from device_agents.protocol import Clipping, Codec
from edgekit.config import BatchNorm, CompressConfig, Format, Quantization, SizeMetric, TrainingConfig
from edgekit.federated.config import (
    LR_FLOOR,
    DeployConfig,
    LrSchedule,
    NoiseGuard,
    OversizedUpdate,
    PartitionScheme,
    RoundSettings,
    SimulationConfig,
    Strategy,
)
from edgekit.trainable.export import TrainableConfig


def _default(cls: type, name: str) -> object:
    """The default of dataclass field ``name`` (with its default factory called)."""
    for f in fields(cls):
        if f.name == name:
            return f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
    raise KeyError(name)


def _values(enum: type) -> list[str]:
    return [member.value for member in enum]


def parse_structured(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``."""
    try:
        m, n = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form M:N (e.g. 2:4)") from None
    return (m, n)


def parse_partition(text: str) -> object:
    """``"iid"`` or ``"dirichlet:ALPHA"`` -> a :class:`~edgekit.federated.config.Partition`."""
    from edgekit.errors import InputError
    from edgekit.federated.config import Partition

    scheme, _, alpha = text.partition(":")
    try:
        if scheme == PartitionScheme.IID.value and not alpha:
            return Partition(PartitionScheme.IID)
        if scheme == PartitionScheme.DIRICHLET.value and alpha:
            return Partition(PartitionScheme.DIRICHLET, float(alpha))
    except (ValueError, InputError):
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not iid or dirichlet:ALPHA (ALPHA > 0, e.g. 0.5)")


def parse_formats(text: str) -> tuple[str, ...]:
    """``"tflite,onnx"`` -> ``("tflite", "onnx")`` (the library validates each name)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="edgekit", description="Compress, export and verify Keras models for edge devices.",
                           exit_codes=True)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    _add_compress(sub)
    _add_trainable(sub)
    fl = sub.add_parser("fl", help="federated learning with Flower")
    fl_sub = fl.add_subparsers(dest="fl_command", parser_class=OneLineParser)
    _add_simulate(fl_sub)
    _add_up(fl_sub)
    _add_fleet_run(fl_sub)
    _add_fleet(sub)
    i = sub.add_parser("inspect", help="ops, sizes and quantization of an artifact; check a folder's manifest")
    i.add_argument("target", help="a .tflite/.onnx file or an edgekit output folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)
    return parser


def _add_fleet(sub: argparse._SubParsersAction) -> None:
    _add_release(sub)
    fleet = sub.add_parser("fleet", help="serve a fleet of devices, roll signed releases out to it, see its status")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", parser_class=OneLineParser)
    _add_fleet_serve(fleet_sub)
    g = fleet_sub.add_parser("register", help="register a device's node.pub (only on the fleet's server)")
    g.add_argument("public_key", metavar="NODE_PUB")
    g.add_argument("--fleet", required=True, metavar="DIR")
    g.set_defaults(func=cmd_fleet_register)
    _add_fleet_rollout(fleet_sub)
    st = fleet_sub.add_parser("status", help="every device's version and telemetry: fleet.json and fleet.png")
    st.add_argument("--fleet", required=True, metavar="DIR")
    st.add_argument("--out", help="where to write fleet.json and fleet.png (default DIR/status)")
    st.set_defaults(func=cmd_fleet_status)


def _add_release(sub: argparse._SubParsersAction) -> None:
    """``keys new`` and ``release``: signing keys and signed releases."""
    from edgekit.fleet.signing import DEFAULT_EXPIRY

    keys = sub.add_parser("keys", help="release signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", parser_class=OneLineParser)
    k = keys_sub.add_parser("new", help="write a new Ed25519 signing key pair: DIR/signing.key (0600), signing.pub")
    k.add_argument("--out", required=True, help="the folder for the key pair (existing keys are never overwritten)")
    k.set_defaults(func=cmd_keys_new)
    r = sub.add_parser("release", help="sign an edgekit output folder as a release (writes DIR/release.json)",
                       description="Sign the manifest and every artifact of DIR (an output of compress, trainable "
                                   "or a federated final/) as release VERSION: TUF targets metadata, Ed25519.")
    r.add_argument("folder", metavar="DIR")
    r.add_argument("--key", required=True, help="signing.key of `edgekit keys new`")
    r.add_argument("--version", dest="release_version", required=True, type=int, metavar="N",
                   help="the release number; devices install only newer ones")
    r.add_argument("--expires-days", type=float, default=DEFAULT_EXPIRY.days,
                   help="devices refuse the release after this many days (default %(default)s)")
    r.set_defaults(func=cmd_release)


def _add_fleet_serve(fleet_sub: argparse._SubParsersAction) -> None:
    from edgekit.fleet.serve import FleetConfig
    from edgekit.fleet.watch import WatchConfig

    s = fleet_sub.add_parser("serve", help="run the fleet's SuperLink (TLS, node keys) until Ctrl-C",
                             description="Start the fleet in DIR (CA, certificates, Flower state; reused on restart): "
                                         "the SuperLink on 127.0.0.1 and the Fleet-only TLS gateway devices dial on "
                                         "--host:--port. Prints the enrollment commands.")
    s.add_argument("--out", required=True, metavar="DIR", help="the fleet folder")
    s.add_argument("--host", default=_default(FleetConfig, "host"),
                   help="address the gateway listens on (default %(default)s; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=_default(FleetConfig, "port"), help="(default %(default)s)")
    s.add_argument("--address", action="append", default=[], metavar="NAME",
                   help="a host name or IP devices dial, put in the server certificate; repeatable")
    s.add_argument("--key", required=True, metavar="SIGNING_KEY",
                   help="the fleet's signing.key: signs the Flower app of every job (devices run only apps signed "
                        "by the key they trust with --trust)")
    watch = WatchConfig()
    s.add_argument("--converge-every", type=_number_or_off, default=watch.converge_every, metavar="SECONDS|off",
                   help="seconds between convergence passes: a device that does not serve the last release rolled "
                        "out (offline then, or joined later) is sent it (default %(default)s)")
    s.add_argument("--collect-every", type=_number_or_off, default=watch.collect_every, metavar="SECONDS|off",
                   help="seconds between collections of the devices' serving telemetry (default %(default)s)")
    s.add_argument("--metrics", type=_metrics_address, metavar="[HOST:]PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST default 127.0.0.1)")
    s.set_defaults(func=cmd_fleet_serve)


def _add_fleet_rollout(fleet_sub: argparse._SubParsersAction) -> None:
    from edgekit.fleet.rollout import Gates, RolloutConfig

    ro = fleet_sub.add_parser("rollout", help="send a signed release to a canary fraction, gate, then to all",
                              description="Devices verify, install, smoke-test and measure the release on their own "
                                          "data. If the canary meets every gate the release goes to all devices; "
                                          "otherwise the canary rolls back and the command exits 4.")
    ro.add_argument("--fleet", required=True, metavar="DIR")
    ro.add_argument("--release", required=True, metavar="DIR", help="a folder signed with edgekit release")
    gates = Gates()
    ro.add_argument("--canary", type=float, default=_default(RolloutConfig, "canary"),
                    help="fraction of devices that get it first (default %(default)s)")
    ro.add_argument("--max-error-rate", type=float, default=gates.max_error_rate,
                    help="failed inferences / inferences on each canary device (default %(default)s)")
    ro.add_argument("--max-p99-ms", type=float, help="p99 latency in ms on each canary device (default: no limit)")
    ro.add_argument("--min-accuracy", type=float, help="accuracy %% on each canary device's own labeled data")
    ro.add_argument("--max-accuracy-drop", type=_number_or_off, default=gates.max_accuracy_drop, metavar="POINTS|off",
                    help="points each canary device may lose against the version it served before; 'off' for the "
                         "first release of a new model family (default %(default)s)")
    ro.add_argument("--quorum", type=float, default=gates.quorum,
                    help="fraction of the credible canary devices that must pass every gate, 0.5-1 (default "
                         "%(default)s: all)")
    ro.add_argument("--seed", type=int, help="make the random choice of canary devices repeatable (default: a new "
                                            "random choice each rollout)")
    ro.add_argument("--stages", type=_fractions, metavar="F,F,...,1",
                    help="staged rollout: cumulative fractions of the devices, e.g. 0.1,0.5,1; each stage is gated "
                         "like a canary (and on its bake); a failed gate rolls every stage back (replaces --canary)")
    ro.add_argument("--bake", type=float, default=_default(RolloutConfig, "bake"), metavar="SECONDS",
                    help="after each gated stage, wait this long and judge what its devices served of the release "
                         "meanwhile: error rate, p99, drift (default %(default)s: no bake)")
    ro.add_argument("--max-drift-psi", type=_number_or_off, default=gates.max_drift_psi, metavar="PSI|off",
                    help="in a bake: the largest population stability index of the served inputs against the "
                         "release's calibration data (default %(default)s)")
    ro.add_argument("--min-nodes", type=int, default=_default(RolloutConfig, "min_nodes"),
                    help="wait for this many connected devices (default %(default)s)")
    ro.add_argument("--timeout", type=float, default=_default(RolloutConfig, "timeout"),
                    help="seconds per step (default %(default)s)")
    ro.set_defaults(func=cmd_fleet_rollout)


def _add_compress(sub: argparse._SubParsersAction) -> None:
    training = TrainingConfig()
    c = sub.add_parser("compress", help="prune/quantize/distill a Keras model into verified TFLite/ONNX",
                       description="Compress MODEL into verified artifacts in --out. With no technique flag: "
                                   "post-training int8. With --max-accuracy-drop and no technique flag: try "
                                   "candidate recipes and keep the smallest within the budget.")
    c.add_argument("model", help="SavedModel folder, .h5, or .keras (tf-keras or Keras 3)")
    _add_custom_objects(c)
    c.add_argument("--data", default="digits", help="'digits' (embedded) or an .npz with x and y (default: digits)")
    c.add_argument("--eval-data", help="an .npz to evaluate on instead of a split of --data")
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--prune", type=float, metavar="S", help="magnitude pruning to sparsity S, e.g. 0.75")
    c.add_argument("--structured", type=parse_structured, metavar="M:N", help="structured sparsity; 2:4 is supported")
    c.add_argument("--quantize", choices=_values(Quantization),
                   help="quantization (default: int8 alone, none when combined with another technique)")
    c.add_argument("--int8-io", action="store_true", help="int8 inputs/outputs for int8/qat TFLite models")
    students = c.add_mutually_exclusive_group()
    students.add_argument("--student-width", type=float, metavar="W", help="distill into a copy W times as wide")
    students.add_argument("--student", metavar="FILE", help="distill into this Keras model")
    c.add_argument("--formats", type=parse_formats, default=tuple(_values(Format)),
                   help=f"comma-separated: {','.join(_values(Format))} (default: all)")
    c.add_argument("--max-accuracy-drop", type=float, metavar="P", help="accuracy budget in points")
    c.add_argument("--select-by", choices=_values(SizeMetric), default=_default(CompressConfig, "select_by").value,
                   help="what the budget search minimises: download size, file size or single-sample latency "
                        "(default: %(default)s)")
    c.add_argument("--threads", type=int, default=_default(CompressConfig, "threads"),
                   help="interpreter threads when verifying and timing artifacts (default %(default)s)")
    c.add_argument("--search-minutes", type=float, metavar="M", default=_default(CompressConfig, "search_minutes"),
                   help="how long the accuracy-controlled search (a remedy when int8 misses the budget) may take "
                        "per format (default %(default)g)")
    c.add_argument("--epochs", type=int, default=training.finetune_epochs,
                   help="fine-tuning epochs for pruning/QAT (default %(default)s; pruning runs more on a small "
                        "dataset: see --prune-min-steps)")
    c.add_argument("--prune-min-steps", type=int, default=training.prune_min_steps,
                   help="optimizer steps pruning's fine-tuning makes at least (default %(default)s)")
    c.add_argument("--distill-epochs", type=int, default=training.distill_epochs,
                   help="distillation epochs (default %(default)s)")
    c.add_argument("--batch-size", type=int, default=training.batch_size, help="(default %(default)s)")
    c.add_argument("--batchnorm", choices=_values(BatchNorm), default=training.batchnorm.value,
                   help="BatchNormalization while fine-tuning: re-estimate its statistics after, freeze it during "
                        "(and re-estimate), or keep what Keras leaves (default %(default)s)")
    c.add_argument("--seed", type=int, default=_default(CompressConfig, "seed"), help="(default %(default)s)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compress)


def _add_custom_objects(p: argparse.ArgumentParser) -> None:
    p.add_argument("--custom-objects", metavar="MODULE", action="append", default=[],
                   help="import this module (e.g. my_project.layers) before loading: it registers the model's custom "
                        "layers with keras.saving.register_keras_serializable. Runs that module's code; repeatable")


def _add_trainable(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("trainable", help="export a trainable TFLite artifact for on-device training",
                       description="Write DIR/trainable.tflite (train/infer/get_weights/set_weights signatures, "
                                   "builtin ops only, initialised with MODEL's weights) and DIR/manifest.json.")
    t.add_argument("model", help="SavedModel folder, .h5, or .keras (tf-keras or Keras 3)")
    _add_custom_objects(t)
    t.add_argument("--out", required=True, help="output folder (written atomically)")
    t.add_argument("--head-only", action="store_true",
                   help="train only the head; the backbone becomes an int8 backbone.tflite (int8 weights with float "
                        "activations where full int8 changes the model's predictions)")
    t.add_argument("--batch-size", type=int, default=_default(TrainableConfig, "batch_size"),
                   help="fixed batch of the train signature (default %(default)s)")
    t.add_argument("--learning-rate", type=float, default=_default(TrainableConfig, "learning_rate"),
                   help="suggested learning rate for devices (default %(default)s)")
    t.add_argument("--data",
                   help="samples of the model's input: 'digits' (embedded, 8x8x1 images) or an .npz with x and y. "
                        "Default: synthetic inputs of the model's shape for verification; --head-only needs real "
                        "samples to calibrate the int8 backbone")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_trainable)


def _add_round_args(p: argparse.ArgumentParser, config: type) -> None:
    """Options shared by ``fl simulate`` and ``fl up``, in help groups by role; defaults from the config
    dataclasses."""
    _add_run_args(p, config)
    _add_aggregation_args(p.add_argument_group("aggregation (the server)"))
    _add_device_training_args(p.add_argument_group("training on the devices"), config)
    _add_update_args(p.add_argument_group("rounds and updates"))
    _add_privacy_args(p.add_argument_group("differential privacy"))
    after = p.add_argument_group("after the rounds")
    after.add_argument("--personalize-epochs", type=int, default=_default(config, "personalize_epochs"),
                       metavar="EPOCHS", help="after the rounds, each device fine-tunes the final model's head "
                       "(after its last Flatten / global pooling layer) on 80%% of its own data and keeps it; "
                       "history.json gets the devices' accuracy before and after on the other 20%% (default "
                       "%(default)s: off)")


def _add_run_args(p: argparse.ArgumentParser, config: type) -> None:
    """The model, the data, the run folder, the clients and the rounds."""
    p.add_argument("--model", required=True, help="a Keras model (trained or never trained)")
    _add_custom_objects(p)
    p.add_argument("--data", default="digits", help="'digits' or an .npz with x and y (default: digits)")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--clients", type=int, default=_default(config, "clients"), help="(default %(default)s)")
    if config.LOCAL_PARTITIONS:
        p.add_argument("--partition", type=parse_partition, default=_default(config, "partition"),
                       help="iid or dirichlet:ALPHA (default %(default)s)")
    p.add_argument("--rounds", type=int, default=_default(RoundSettings, "rounds"), help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=_default(RoundSettings, "seed"), help="(default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_aggregation_args(g: argparse._ArgumentGroup) -> None:
    """The strategy and its robust-aggregation settings."""
    from edgekit.federated.strategies import STRATEGIES

    described = [f"{k.value}: {spec.summary}" + (f", server learning rate {spec.server_learning_rate:g}"
                                                  if spec.server_learning_rate else "")
                 for k, spec in sorted(STRATEGIES.items(), key=lambda kv: kv[0].value)]
    g.add_argument("--strategy", choices=_values(Strategy),
                   help="; ".join(described) + f" (default {RoundSettings().aggregation.value}; "
                   f"{RoundSettings(dp_noise_multiplier=1.0).aggregation.value} with differential privacy)")
    g.add_argument("--server-learning-rate", type=float, metavar="ETA",
                   help="server learning rate of fedavgm/fedadam/fedyogi/fedadagrad (default: the strategy's)")
    g.add_argument("--server-momentum", type=float, default=_default(RoundSettings, "server_momentum"),
                   help="fedavgm momentum, fedadam/fedyogi beta_1 (default %(default)s)")
    g.add_argument("--proximal-mu", type=float, default=_default(RoundSettings, "proximal_mu"),
                   help="FedProx mu (default %(default)s)")
    g.add_argument("--trim-beta", type=float, default=_default(RoundSettings, "trim_beta"),
                   help="trimmed: the fraction of updates cut at each end of every coordinate (default %(default)s)")
    g.add_argument("--byzantine", type=int, default=_default(RoundSettings, "byzantine"),
                   help="multikrum: the number of attackers it assumes per round (default %(default)s)")
    g.add_argument("--update-norm-bound", type=_number_or_off, default=_default(RoundSettings, "update_norm_bound"),
                   metavar="RATIO|off", help="scale every update down to this many times the round's median update "
                   "norm (default %(default)s)")
    g.add_argument("--screen-loss-ratio", type=_number_or_off, default=_default(RoundSettings, "screen_loss_ratio"),
                   metavar="RATIO|off", help="drop an update whose own loss on the server's evaluation data is over "
                   "this many times the round's median (and 3 robust deviations above it) (default %(default)s)")


def _add_device_training_args(g: argparse._ArgumentGroup, config: type) -> None:
    """What each device's local training runs with."""
    g.add_argument("--local-epochs", type=int, default=_default(RoundSettings, "local_epochs"),
                   help="(default %(default)s)")
    g.add_argument("--learning-rate", type=float, default=_default(RoundSettings, "learning_rate"),
                   help="on-device learning rate (default %(default)s)")
    g.add_argument("--lr-schedule", choices=_values(LrSchedule), default=_default(RoundSettings, "lr_schedule").value,
                   help=f"on-device learning rate over the rounds: constant, or cosine decay to {LR_FLOOR:g}x the "
                   "rate at the last round (default %(default)s)")
    g.add_argument("--client-momentum", type=float, default=_default(RoundSettings, "client_momentum"),
                   metavar="BETA", help="on-device SGD momentum, zeroed at each round's start (default %(default)s: "
                   "plain SGD)")
    g.add_argument("--batch-size", type=int, default=_default(config, "batch_size"),
                   help="on-device batch size (default %(default)s)")
    g.add_argument("--head-only", action="store_true",
                   help="the devices train the head alone (after the last Flatten / global pooling layer) on the "
                        "features of the frozen rest as int8, and only the head is federated: for models whose "
                        "other layers have no on-device gradient (LSTM, GRU) or to send fewer weights")


def _add_update_args(g: argparse._ArgumentGroup) -> None:
    """Which clients a round samples and how their updates travel and are checked."""
    g.add_argument("--fraction", type=float, default=_default(RoundSettings, "fraction"),
                   help="fraction of clients sampled per round (default %(default)s)")
    g.add_argument("--min-fraction", type=float, default=_default(RoundSettings, "min_fraction"),
                   help="a round needs valid updates from this fraction of the sampled clients (default %(default)s)")
    g.add_argument("--compress-updates", nargs="?", const=Codec.INT8.value, default=Codec.FLOAT32.value,
                   choices=_values(Codec), metavar="CODEC",
                   help="clients send weight deltas: int8 (one scale per tensor, ~4x fewer bytes; the value when "
                        "the flag is given alone) or int4 (block scales, stochastic rounding, error feedback on "
                        "the device, ~7.5x fewer bytes) (default %(default)s: no compression)")
    g.add_argument("--oversized-updates", choices=_values(OversizedUpdate),
                   default=_default(RoundSettings, "oversized_updates").value,
                   help="an update over 5x the round's median norm (and over 0.1x the model's): reject it, or bound "
                        "its norm to that limit keeping its direction (default %(default)s)")


def _add_privacy_args(g: argparse._ArgumentGroup) -> None:
    """Central differential privacy: clipping on the devices, noise on the server."""
    g.add_argument("--dp-noise", type=float, metavar="SIGMA",
                   help="differential privacy: each device clips its update, the server adds Gaussian noise "
                        "with this multiplier")
    g.add_argument("--dp-clip", type=float, default=_default(RoundSettings, "dp_clipping_norm"),
                   help="L2 clipping norm of each update (default %(default)s)")
    g.add_argument("--dp-delta", type=float, default=_default(RoundSettings, "dp_delta"),
                   help="delta of the reported (epsilon, delta) (default %(default)s)")
    g.add_argument("--dp-clipping", choices=[c.value for c in Clipping if c is not Clipping.NONE],
                   default=_default(RoundSettings, "dp_clipping").value,
                   help="fixed: every update clipped to --dp-clip; adaptive: starts at --dp-clip and follows the "
                        "median update norm (Flower's adaptive clipping) (default %(default)s)")
    g.add_argument("--dp-noise-guard", choices=_values(NoiseGuard),
                   default=_default(RoundSettings, "dp_noise_guard").value,
                   help="when the noise would be larger than any clipped mean update (sigma x sqrt(weights) > "
                        "clients per round): refuse to start, or warn and run (default %(default)s)")


def _add_simulate(fl_sub: argparse._SubParsersAction) -> None:
    sim = fl_sub.add_parser("simulate", help="a federated run in Flower's simulation engine (Ray), one machine",
                            description="Each virtual client trains the trainable TFLite artifact in LiteRT on its "
                                        "own seeded partition; the server aggregates with a Flower strategy, "
                                        "evaluates on held-out data every round and checkpoints.")
    _add_round_args(sim, SimulationConfig)
    sim.add_argument("--local-dp-epsilon", type=float, metavar="EPSILON",
                     help="local differential privacy: each device clips (--dp-clip) and adds its own noise "
                          "(Flower's LocalDpMod), for devices that do not trust the server")
    sim.add_argument("--secagg", action="store_true",
                     help="secure aggregation (SecAgg+): the server sees only the sum of the masked updates")
    sim.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    sim.set_defaults(func=cmd_fl_simulate)


def _add_up(fl_sub: argparse._SubParsersAction) -> None:
    dep = fl_sub.add_parser("up", help="a real federation here: flower-superlink + N flower-supernode, TLS",
                            description="Start a SuperLink and one SuperNode per client on 127.0.0.1 (TLS with a "
                                        "generated CA unless --insecure), run the federation with flwr run, stop "
                                        "every process, and compress the final global model.")
    _add_round_args(dep, DeployConfig)
    dep.add_argument("--insecure", action="store_true", help="no TLS (only when asked)")
    dep.add_argument("--no-node-auth", action="store_true",
                     help="do not register SuperNode key pairs (by default each SuperNode gets an ECDSA key)")
    _add_timeout(dep, DeployConfig)
    dep.set_defaults(func=cmd_fl_up)


def _add_timeout(p: argparse.ArgumentParser, config: type) -> None:
    p.add_argument("--timeout", type=float, default=_default(config, "timeout"),
                   help="seconds for the whole run (default %(default)s)")


def _add_fleet_run(fl_sub: argparse._SubParsersAction) -> None:
    from edgekit.federated.fleet_run import FleetRunConfig

    run = fl_sub.add_parser("run", help="federated rounds on a served fleet (edgekit fleet serve), devices' own data",
                            description="Each device trains the trainable release it has installed (roll one out "
                                        "first) on the data it joined with; --data is the server's own data "
                                        "(rounds are evaluated on its held-out split). Writes history.json, "
                                        "accuracy.png and final/ to --out.")
    _add_round_args(run, FleetRunConfig)
    run.add_argument("--fleet", required=True, metavar="DIR", help="the served fleet folder")
    _add_timeout(run, FleetRunConfig)
    run.set_defaults(func=cmd_fl_run)


def cmd_fl_run(args: argparse.Namespace) -> int:
    from edgekit.federated.fleet_run import FleetRunConfig, run_on_fleet

    config = FleetRunConfig(clients=args.clients, rounds=_round_settings(args), batch_size=args.batch_size,
                            timeout=args.timeout, personalize_epochs=args.personalize_epochs,
                            head_only=args.head_only)
    with _head_only_hint(args.head_only, whole_model=False):
        result = run_on_fleet(args.model, args.data, args.out, args.fleet, config, progress=not args.quiet,
                              log=lambda line: print(line, flush=True))
    print(f"wrote {result.out}: history.json, accuracy.png, final/ (sign it with edgekit release, then roll it out)")
    return int(ExitCode.SUCCESS)


def cmd_compress(args: argparse.Namespace) -> int:
    import edgekit

    from ._render import format_table

    technique = any(v is not None for v in (args.prune, args.structured, args.student_width, args.student))
    recipe = None
    if technique or args.quantize is not None:
        recipe = edgekit.Recipe(prune=args.prune, structured=args.structured,
                                quantize=args.quantize or ("none" if technique else "int8"),
                                student_width=args.student_width, student=args.student)
    config = edgekit.CompressConfig(
        recipe=recipe, formats=args.formats, max_accuracy_drop=args.max_accuracy_drop, int8_io=args.int8_io,
        select_by=args.select_by, seed=args.seed, threads=args.threads, search_minutes=args.search_minutes,
        training=edgekit.TrainingConfig(finetune_epochs=args.epochs, prune_min_steps=args.prune_min_steps,
                                        distill_epochs=args.distill_epochs,
                                        batch_size=args.batch_size, batchnorm=args.batchnorm))
    result = edgekit.compress(args.model, args.data, args.out, config=config, eval_data=args.eval_data,
                              progress=not args.quiet)
    print(f"source: {result.source['path']}  accuracy {result.source['accuracy']:.2f}%  "
          f"params {result.source['params']:,}")
    print(format_table(result))
    for line in result.warnings:
        print(f"edgekit: warning: {line}", file=sys.stderr)
    files = ", ".join(f"{a.filename} ({a.bytes:,} bytes)" for a in result.selected.artifacts)
    keras_file = ", model.keras" if result.manifest and result.manifest.get("keras_model") else ""
    print(f"wrote {result.out}: {files}{keras_file}, manifest.json, report.md")
    for fmt, error in result.selected.format_errors.items():
        print(f"edgekit: warning: no {fmt} artifact: {error}", file=sys.stderr)
    from edgekit.artifacts.report import remedy_notes, slower_notes

    for line in remedy_notes(result.selected):
        print(f"edgekit: note: {line}", file=sys.stderr)
    for line in slower_notes(result.selected):
        print(f"edgekit: warning: {line}", file=sys.stderr)
    return int(ExitCode.SUCCESS)


def cmd_trainable(args: argparse.Namespace) -> int:
    import math

    import edgekit

    config = edgekit.TrainableConfig(head_only=args.head_only, batch_size=args.batch_size,
                                     learning_rate=args.learning_rate)
    with _head_only_hint(args.head_only, whole_model=True):
        result = edgekit.export_trainable(args.model, args.out, data=args.data, config=config,
                                          progress=not args.quiet)
    spec, check = result.manifest["trainable"], result.manifest["verification"]
    print(f"trainable ({spec['mode']}): {len(spec['tensors'])} tensors, batch {spec['batch_size']}, "
          f"{sum(math.prod(t['shape']) for t in spec['tensors']):,} trainable weights")
    print(f"verified in {check['runtime']}: infer max abs diff {check['infer_max_abs_diff']:.2g}, "
          f"one train step vs TensorFlow max abs diff {check['train_step_max_abs_diff']:.2g}")
    for line in result.warnings:
        print(f"edgekit: warning: {line}", file=sys.stderr)
    files = ", ".join(f"{a['file']} ({'float32' if a['quantization'] == 'none' else a['quantization']}, "
                      f"{a['bytes']:,} bytes)" for a in result.manifest["artifacts"])
    print(f"wrote {result.out}: {files}, manifest.json")
    return int(ExitCode.SUCCESS)


def _round_settings(args: argparse.Namespace) -> RoundSettings:
    return RoundSettings(rounds=args.rounds, local_epochs=args.local_epochs, learning_rate=args.learning_rate,
                         lr_schedule=args.lr_schedule, client_momentum=args.client_momentum,
                         strategy=args.strategy, proximal_mu=args.proximal_mu, trim_beta=args.trim_beta,
                         byzantine=args.byzantine, update_norm_bound=args.update_norm_bound,
                         screen_loss_ratio=args.screen_loss_ratio, fraction=args.fraction,
                         server_learning_rate=args.server_learning_rate, server_momentum=args.server_momentum,
                         min_fraction=args.min_fraction, compress_updates=args.compress_updates, seed=args.seed,
                         oversized_updates=args.oversized_updates, dp_noise_multiplier=args.dp_noise,
                         dp_clipping_norm=args.dp_clip, dp_delta=args.dp_delta, dp_noise_guard=args.dp_noise_guard,
                         dp_clipping=args.dp_clipping)


@contextmanager
def _head_only_hint(head_only: bool, *, whole_model: bool) -> Iterator[None]:
    """A layer without an on-device gradient, refused: the line says --head-only trains the head alone (unless it
    was given). ``whole_model``: say it also when the model as a whole has no tf-keras twin (a graph), whose head
    the trainable export splits off; a federated run needs the tf-keras model either way."""
    from edgekit.errors import UnsupportedLayerError

    try:
        yield
    except UnsupportedLayerError as exc:
        if head_only or (exc.layer_name == "?" and not whole_model):  # "?": the model itself, not one of its layers
            raise
        raise UnsupportedLayerError(f"{exc}; --head-only trains the head alone on the frozen rest's features",
                                    layer_name=exc.layer_name, layer_type=exc.layer_type) from None


def cmd_fl_simulate(args: argparse.Namespace) -> int:
    from edgekit.federated.simulate import simulate

    rounds = _round_settings(args)
    config = SimulationConfig(clients=args.clients, partition=args.partition, rounds=rounds,
                              batch_size=args.batch_size, resume=args.resume, secure_aggregation=args.secagg,
                              local_dp_epsilon=args.local_dp_epsilon, personalize_epochs=args.personalize_epochs,
                              head_only=args.head_only)
    with _head_only_hint(args.head_only, whole_model=False):
        result = simulate(args.model, args.data, args.out, config=config, progress=not args.quiet,
                          log=lambda line: print(line, flush=True))
    print(f"wrote {result.out}: history.json, accuracy.png, checkpoints/, final/ (int8 model.tflite + manifest)")
    return int(ExitCode.SUCCESS)


def cmd_fl_up(args: argparse.Namespace) -> int:
    from edgekit.federated.deploy import up

    config = DeployConfig(clients=args.clients, partition=args.partition, rounds=_round_settings(args),
                          batch_size=args.batch_size, insecure=args.insecure, node_auth=not args.no_node_auth,
                          timeout=args.timeout, personalize_epochs=args.personalize_epochs,
                          head_only=args.head_only)
    with _head_only_hint(args.head_only, whole_model=False):
        result = up(args.model, args.data, args.out, config=config, progress=not args.quiet,
                    log=lambda line: print(line, flush=True))
    print(f"wrote {result.out}: history.json, accuracy.png, certs/, logs/, final/ (int8 model.tflite + manifest)")
    return int(ExitCode.SUCCESS)


def cmd_keys_new(args: argparse.Namespace) -> int:
    from edgekit.fleet.signing import new_keys, public_key_id

    private, public = new_keys(args.out)
    print(f"wrote {private} (private, mode 0600: keep it off devices) and {public} (give it to devices: "
          f"edgekit-agent install --trust {public}); key id {public_key_id(public)[:16]}")
    return int(ExitCode.SUCCESS)


def cmd_release(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from edgekit.errors import InputError
    from edgekit.fleet.signing import sign_release

    if not 0 < args.expires_days <= 3650:
        raise InputError(f"--expires-days {args.expires_days:g} must be more than 0 and at most 3650")
    path = sign_release(args.folder, args.key, version=args.release_version, expires=timedelta(days=args.expires_days))
    print(f"signed release {args.release_version} of {args.folder}: {path} (expires in {args.expires_days:g} days)")
    return int(ExitCode.SUCCESS)


def cmd_fleet_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from edgekit.fleet.serve import FleetConfig, serve
    from edgekit.fleet.watch import WatchConfig

    watch = WatchConfig(converge_every=args.converge_every, collect_every=args.collect_every, metrics=args.metrics)
    fleet = serve(args.out, FleetConfig(host=args.host, port=args.port, addresses=tuple(args.address)),
                  signing_key=args.key, watch=watch, log=lambda line: print(line, flush=True))
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop.append(signum))
    dial = args.address[0] if args.address else (args.host if args.host not in ("0.0.0.0", "::") else "HOST")
    print(f"fleet served from {fleet.folder}: devices connect to {fleet.gateway} (TLS, registered node keys only); "
          f"control on 127.0.0.1:{fleet.control} (this machine only)\n"
          f"on each device:  edgekit-agent node-key --out keys\n"
          f"here, per device: edgekit fleet register --fleet {args.out} keys/node.pub\n"
          f"on each device:  edgekit-agent join --superlink {dial}:{args.port} --ca ca.crt --key keys/node.key "
          f"--data DEVICE_DATA.npz --store STORE --trust signing.pub   (ca.crt: {fleet.ca})", flush=True)
    if fleet.watcher is not None and fleet.watcher.metrics is not None:
        print(f"metrics: {fleet.watcher.metrics.url}", flush=True)
    try:
        while not stop:
            fleet.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    print("fleet stopped")
    return int(ExitCode.SUCCESS)


def cmd_fleet_register(args: argparse.Namespace) -> int:
    from edgekit.fleet.serve import register_node

    print(register_node(args.fleet, args.public_key))
    return int(ExitCode.SUCCESS)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated fractions, e.g. 0.1,0.5,1") from None


def _metrics_address(text: str) -> object:
    from edgekit.errors import InputError
    from edgekit.fleet.metrics import MetricsAddress

    host, _, port = text.rpartition(":")
    try:
        return MetricsAddress(host=host or MetricsAddress.host, port=int(port))
    except (ValueError, InputError):
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST:]PORT with a port from 1 to 65535, e.g. "
                                         "127.0.0.1:9094") from None


def _number_or_off(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'off'") from None


def cmd_fleet_rollout(args: argparse.Namespace) -> int:
    from edgekit.fleet.rollout import Gates, RolloutConfig, rollout

    config = RolloutConfig(canary=args.canary, min_nodes=args.min_nodes, timeout=args.timeout, seed=args.seed,
                           stages=args.stages or (), bake=args.bake,
                           gates=Gates(max_error_rate=args.max_error_rate, max_p99_ms=args.max_p99_ms,
                                       min_accuracy=args.min_accuracy, max_accuracy_drop=args.max_accuracy_drop,
                                       quorum=args.quorum, max_drift_psi=args.max_drift_psi))
    result = rollout(args.fleet, args.release, config, log=lambda line: print(line, flush=True))
    print(f"rollout complete: release {result['release_id']} on {result['nodes']} device(s) "
          f"(report: {result['job']}/rollout.json)")
    return int(ExitCode.SUCCESS)


def cmd_fleet_status(args: argparse.Namespace) -> int:
    from edgekit.fleet.rollout import fleet_status

    summary = fleet_status(args.fleet, args.out, log=lambda line: print(line, flush=True))
    for row in summary["nodes"]:
        release = f"release {row['release']:g}" if row.get("release", -1) >= 0 else "unsigned"
        print(f"node {row['node']}: " + (f"{row['version_id'] or 'no model'} ({release}), p99 {row['p99_ms']:.2f} ms, "
                                         f"errors {row['errors']:g}/{row['inferences']:g}"
                                         + (f", accuracy {row['accuracy']:.1f}%" if row["accuracy"] >= 0 else "")
                                         if row["ok"] else f"no answer ({row['reason']})"))
    for line in _state_lines(summary):
        print(line)
    print(f"wrote {summary['out']}/fleet.json, fleet.png and serving.png")
    return int(ExitCode.SUCCESS)


def _state_lines(summary: dict) -> list[str]:
    """The desired release, each device's state against it, and per version what it served (with drift)."""
    from edgekit.fleet.telemetry import DRIFT_THRESHOLD

    desired = summary["desired"]
    lines = [f"desired: release {desired['release']} ({desired['release_id']})" if desired else
             "desired: none (no rollout has completed)"]
    for device in summary["devices"]:
        lines.append(f"  node {device['node']}: {device['state']}"
                     + (f" ({device['reason']})" if device["reason"] else ""))
    for version, s in summary["serving"].items():
        line = (f"served {version}: {s['calls']} calls, {s['samples']} samples on {s['nodes']} device(s), error rate "
                f"{s['error_rate'] or 0:.3f}, p99 {1000 * (s['p99_s'] or 0):.2f} ms")
        if s["drift_psi"] is not None:
            line += f", drift PSI {s['drift_psi']:.3f}"
            if s["drifted"]:
                line += f" > {DRIFT_THRESHOLD:g}: DRIFT, its inputs no longer look like its calibration data"
        lines.append(line)
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgekit.artifacts.inspection import inspect_artifact

    from ._render import format_inspection

    info = inspect_artifact(args.target)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return int(ExitCode.SUCCESS if info.get("manifest_ok") is not False else ExitCode.FAILURE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "version", False):
        from edgekit._version import __version__

        print(f"edgekit {__version__}")
        return int(ExitCode.SUCCESS)
    for group in ("fl", "keys", "fleet"):
        if args.command == group and not getattr(args, f"{group}_command", None):
            parser.parse_args([group, "--help"])  # prints the group's subcommands and exits
    if not getattr(args, "func", None):
        parser.print_help()
        return int(ExitCode.BAD_INPUT)
    quiet_native_logs()
    from edgekit.errors import EdgeKitError

    def command() -> int:
        from edgekit.loading.models import import_custom_objects

        for module in getattr(args, "custom_objects", []):
            import_custom_objects(module)
        return args.func(args)

    return run("edgekit", command, (EdgeKitError,))


if __name__ == "__main__":
    sys.exit(main())
