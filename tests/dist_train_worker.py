"""Run by tests/test_distributed.py under mpiexec or torchrun: train a tiny model for a few steps.

Writes, per rank, the parameters it ends with and the ids of the images it was fed
(image i is filled with the value 10 * i in its red channel).
"""

import sys

import torch as th

from guided_diffusion import dist_util, logger
from guided_diffusion import script_util as su
from guided_diffusion.image_datasets import load_data
from guided_diffusion.train_util import TrainLoop


def recording(data, seen):
    for batch, cond in data:
        seen.update(round(v) for v in ((batch[:, 0, 0, 0] + 1) * 127.5 / 10).tolist())
        yield batch, cond


def main(data_dir, out_dir):
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    logger.configure(dir=out_dir, format_strs=["log"])
    th.manual_seed(1000 + rank)  # different initial weights per rank: setup must sync them
    flags = {
        **su.model_and_diffusion_defaults(),
        "image_size": 16,
        "num_channels": 32,
        "num_res_blocks": 1,
        "attention_resolutions": "8",
        "diffusion_steps": 50,
    }
    model, diffusion = su.create_model_and_diffusion(**flags)
    seen = set()
    data = recording(load_data(data_dir=data_dir, batch_size=2, image_size=16, deterministic=True), seen)
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=2,
        microbatch=1,
        lr=1e-3,
        ema_rate="0.9",
        log_interval=1,
        save_interval=100,
        resume_checkpoint="",
        lr_anneal_steps=3,
    )
    initial = [p.detach().clone() for p in model.parameters()]
    loop.run_loop()
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), initial))
    # Resuming reads the checkpoint on rank 0 and broadcasts its bytes to the other rank.
    fresh, _ = su.create_model_and_diffusion(**flags)
    resumed = TrainLoop(
        model=fresh,
        diffusion=diffusion,
        data=data,
        batch_size=2,
        microbatch=1,
        lr=1e-3,
        ema_rate="0.9",
        log_interval=1,
        save_interval=100,
        lr_anneal_steps=3,
        resume_checkpoint=f"{out_dir}/model000003.pt",
    )
    resume_ok = resumed.resume_step == 3 and all(th.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    try:  # a checkpoint rank 0 cannot read must fail on every rank, not leave rank 1 waiting
        dist_util.load_state_dict(f"{out_dir}/missing.pt")
        missing_ok = False
    except (FileNotFoundError, RuntimeError) as exc:
        missing_ok = "missing.pt" in str(exc)
    params = [p.detach() for p in model.parameters()]
    th.save(
        {
            "missing_ok": missing_ok,
            "params": params,
            "seen": sorted(seen),
            "moved": moved,
            "resume_ok": resume_ok,
            "world": dist_util.get_world_size(),
        },
        f"{out_dir}/rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
