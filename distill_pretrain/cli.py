"""`distill pretrain RECIPE [k=v...]` and `distill export CKPT_DIR OUT_DIR`."""

from __future__ import annotations

import argparse


def register(sub, add_recipe_args) -> None:
    p = sub.add_parser("pretrain", help="distil the teacher into the student on the shards "
                                        "(one process, or one rank of torchrun / Slurm)")
    add_recipe_args(p)
    p.set_defaults(func=_pretrain)
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

    recipe = args.load_recipe()
    from distill_pretrain.distributed import shutdown
    from distill_pretrain.train import pretrain

    # torch.distributed's deprecation notices, raised from inside DeepSpeed, once per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    try:
        result = pretrain(recipe)
    finally:
        shutdown()
    if result.stopped:  # SIGTERM: checkpoint saved; 143 = 128 + SIGTERM, as if killed
        return 143
    if result.rank != 0:
        return 0
    if result.export_dir is not None:
        print(f"student: {result.export_dir}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from distill_pretrain.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out_dir, teacher=args.teacher,
                            onnx=args.onnx, onnx_int8=args.onnx_int8, report=args.report))
    return 0
