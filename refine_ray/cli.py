"""``refine-ray`` command line: ``refine-ray train [--config FILE] [key.path=value ...]``."""
from __future__ import annotations

import argparse
import sys

from refine_ray.config import ConfigError, load_config

DEFAULT_CONFIG = "configs/tiny_deltanet_mid.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refine-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a REFINE training job")
    train.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. refine.n_chunks=4 train.steps=10")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"refine-ray: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "train":
        from refine_ray.data import DataError
        from refine_ray.train import run_training

        try:
            history = run_training(cfg)
        except (DataError, ConfigError) as e:
            print(f"refine-ray: {e}", file=sys.stderr)
            return 2
        last = history[-1]
        print(f"done: {len(history)} steps, loss {last['loss']:.4f}, reward {last['reward/mean']:.4f}, "
              f"weights v{int(last['version'])}; outputs in {cfg.train.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
