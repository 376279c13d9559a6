"""``bame methods``, ``bame models``, ``bame datasets``: what is registered, one line each."""

from __future__ import annotations

import argparse


def _methods(args: argparse.Namespace) -> int:
    from bame import methods

    for name, text in methods.available().items():
        print(f"{name:10s} {text}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from bame import models

    for name, text in models.available().items():
        print(f"{name:22s} {text}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from bame import data

    for name, spec in data.available().items():
        print(f"{name:14s} {spec.description} (default model: {spec.default_model})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, func, text in [("methods", _methods, "list the sparse-training methods"),
                             ("models", _models, "list the models"),
                             ("datasets", _datasets, "list the datasets")]:
        parser = sub.add_parser(name, help=text, description=text)
        parser.set_defaults(run=func)
