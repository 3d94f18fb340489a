"""`distill pretrain RECIPE [k=v...]`, `distill init RECIPE OUT_DIR [k=v...]` and
`distill export CKPT_DIR OUT_DIR`."""

from __future__ import annotations

import argparse


def register(sub, add_recipe_args) -> None:
    p = sub.add_parser("pretrain", help="distil the teacher into the student on the shards "
                                        "(one process, or one rank of torchrun / Slurm)")
    add_recipe_args(p)
    p.set_defaults(func=_pretrain)
    i = sub.add_parser("init", help="write the student as pretraining would start it (any "
                                    "student.init, pruned included) as a Hugging Face "
                                    "folder with init.json (what it kept of the teacher)")
    i.add_argument("recipe", help="recipe YAML (a path, or a name in configs/)")
    i.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face folder to write")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. student.hidden_size=256")
    i.set_defaults(func=_init)
    e = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder")
    e.add_argument("checkpoint", metavar="CKPT_DIR",
                   help="a checkpoint folder (step-NNNNNNNN) or a run's train.output_dir "
                        "(its newest complete checkpoint)")
    e.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face folder to write")
    e.add_argument("--onnx", action="store_true",
                   help="also write the encoder in ONNX: OUT_DIR/onnx/model.onnx")
    e.add_argument("--onnx-int8", action="store_true",
                   help="also write a dynamic int8 variant: OUT_DIR/onnx/model_int8.onnx "
                        "(implies --onnx)")
    e.add_argument("--teacher", metavar="DIR_OR_ID",
                   help="the teacher (folder, asset or Hub id) when the one the run recorded "
                        "is not reachable here; its pooler and sentence-transformers layout "
                        "are carried over")
    e.add_argument("--report", metavar="REPORT_JSON",
                   help="a `distill report` report.json: the card quotes the speed-ups it "
                        "measured for OUT_DIR")
    e.set_defaults(func=_export)


def _pretrain(args: argparse.Namespace) -> int:
    import warnings

    from distill_pretrain.stop import StopSignal

    # First: a SIGTERM from here on (during setup too) stops at the next step boundary,
    # every rank with a checkpoint, rather than killing this rank mid-setup.
    stop = StopSignal()
    try:
        job = args.load_recipe().pretrain_job()
        from distill_pretrain.train import run_pretrain

        # torch.distributed's deprecation notices, raised from inside DeepSpeed, once per
        # call.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        result = run_pretrain(job)
    finally:
        stop.restore()
    if result.stopped:  # SIGTERM: checkpoint saved; 143 = 128 + SIGTERM, as if killed
        return 143
    if result.rank != 0:
        return 0
    if result.export_dir is not None:
        print(f"student: {result.export_dir}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _init(args: argparse.Namespace) -> int:
    import json

    from distill_pretrain.initial import write_initial_student

    folder = write_initial_student(args.load_recipe().pretrain_job(), args.out_dir)
    record = json.loads((folder / "init.json").read_text())
    shape = record["student"]
    print(f"student ({record['init']}, {shape['layers']} x {shape['hidden_size']}, "
          f"{shape['heads']} heads, FFN {shape['intermediate_size']}): {folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from distill_pretrain.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out_dir, teacher=args.teacher,
                            onnx=args.onnx, onnx_int8=args.onnx_int8, report=args.report))
    return 0
