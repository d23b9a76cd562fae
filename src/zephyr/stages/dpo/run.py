"""dDPO: direct preference optimisation on the shared training loop.

The task turns a pairs file into tokenized pairs (`zephyr.training.pairs`: chat template, truncation,
bad-pair policy; tokenized once into the tokenized-data cache, mapped by every process), a micro-batch of pairs into one packed row, and a row into per-pair answer log-probs of
the policy; the reference's come from `zephyr.stages.dpo.reference` (precomputed and cached, online, or none);
the loss is picked once from `zephyr.training.losses` by name. Losses and metrics are sums over the pairs
of the micro-batch: the loop divides by the number of pairs in the whole optimizer step.

Prefix sharing (`prefix_sharing`): each pair's prompt runs once, in the policy's step, in the online
reference and in the precomputed reference pass (`zephyr.training.logps.pack_pairs`). tokens/s still counts
the prompt once per answer, so that it reads the same with and without sharing.

Metrics (TRL's names): rewards/chosen, rewards/rejected (β × log-ratio; SimPO: β × mean token log-prob),
rewards/margins, rewards/accuracies (share of pairs with chosen reward > rejected reward), logps/chosen,
logps/rejected (the policy's summed answer log-probs); the loop adds loss, lr, grad_norm, tokens/s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zephyr import io
from zephyr.core.config import DPOConfig
from zephyr.stages import stage
from zephyr.stages.dpo import reference as ref_mod
from zephyr.training.logps import PairBatch, pack_pairs, pair_logps
from zephyr.training.losses import LossParams, PairLogps, PreferenceLossFn, get_preference_loss
from zephyr.training.pairs import PairOptions, PairSet, TokenizedPair, load_pairs
from zephyr.training.task import StepOutput

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

DATA_REPORT = stage("dpo").output("data")  # the stage table declares the outputs
# The reference pass holds no activations for backward: it can take batches this many times larger.
REFERENCE_BATCH_FACTOR = 4


@dataclass(frozen=True)
class PairExample:
    """A training or eval example: a tokenized pair and its place (split, index) in the reference tables."""

    split: str  # "train" | "eval"
    index: int
    pair: TokenizedPair


class PairExamples(Sequence[PairExample]):
    """The examples of a split, made from its `PairSet` when used."""

    def __init__(self, split: str, pairs: PairSet):
        self.split, self.pairs = split, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        k = range(len(self))[i]
        return PairExample(self.split, k, self.pairs[k])


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout of the model: the policy's train-mode log-probs must equal the reference's at step 0
    (dropout would make policy and reference disagree at random)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def preference_step(
    model: torch.nn.Module,
    batch: PairBatch,
    reference: ref_mod.Reference,
    loss_fn: PreferenceLossFn,
    params: LossParams,
) -> StepOutput:
    """The loss and metric sums of one micro-batch of pairs (a `pack_pairs` batch): the policy's log-probs,
    the reference's, the loss."""
    policy = pair_logps(model, batch)
    ref = reference.logps(model, batch)
    if ref is not None:
        ref = PairLogps(
            *(
                t.to(device=policy.chosen.device, dtype=policy.chosen.dtype)
                for t in (ref.chosen, ref.rejected)
            ),
            ref.chosen_tokens.to(policy.chosen.device),
            ref.rejected_tokens.to(policy.chosen.device),
        )
    out = loss_fn(policy, ref, params)
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "logps/chosen": policy.chosen.detach().sum(),
        "logps/rejected": policy.rejected.detach().sum(),
    }
    return StepOutput(loss_sum=out.losses.sum(), metric_sums=metrics)


class DPOTask:
    """A `TrainingTask` over preference pairs (units: pairs)."""

    name = "dpo"
    batch_unit = "pairs"  # what one example of a batch is

    def __init__(
        self,
        cfg: DPOConfig,
        *,
        resume: bool = False,
        cache_dir: str | Path | None = None,
        data_cache_dir: str | Path | None = None,
        tokenizer: Any = None,
    ):
        from zephyr.models.load import load_tokenizer
        from zephyr.scoring.attention import register_packed_attention

        self.cfg = cfg
        self.resume = resume
        self.cache_dir = Path(cache_dir) if cache_dir is not None else ref_mod.default_cache_dir()
        self.tokenizer = tokenizer or load_tokenizer(
            cfg.tokenizer or cfg.model,
            chat_template=cfg.chat_template,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.attn_implementation = register_packed_attention()  # read by the loop when it loads the model
        # read with getattr: configs written before the field existed (and their saved copies) lack it
        self.prefix_sharing = cfg.prefix_sharing
        self.loss_fn = get_preference_loss(cfg.loss)
        self.params = LossParams(cfg.beta, cfg.label_smoothing, cfg.rpo_alpha, cfg.simpo_gamma)

        options = PairOptions(
            cfg.max_length,
            cfg.max_prompt_length,
            cfg.on_bad_record,
            limit=cfg.max_samples,
            eval_fraction=cfg.eval_fraction,
            seed=cfg.seed,
        )
        self.data = load_pairs(
            self.tokenizer, cfg.train_data, cfg.eval_data, options=options, cache_dir=data_cache_dir
        )
        self.stats = self.data.stats
        self._train = PairExamples("train", self.data.train)
        self._eval = PairExamples("eval", self.data.eval)
        # nothing to prepare without a reference; the others are made ready by `prepare`
        self.reference = ref_mod.Reference(cfg.reference, ready=cfg.reference == "none")
        self.reference_status: dict[str, str] = {}  # split -> "cached" | "computed" (precomputed only)

    # --- the TrainingTask protocol ------------------------------------------------------------------------

    def summary(self) -> str:
        s = self.stats
        return (
            f"{len(self._train)} train and {len(self._eval)} eval pairs ({len(s.bad)} bad pairs skipped; "
            f"truncated to {self.cfg.max_length}/{self.cfg.max_prompt_length}: {s.truncated_prompts} prompts, "
            f"{s.truncated_chosen} chosen, {s.truncated_rejected} rejected answers), loss {self.cfg.loss} "
            f"β={self.cfg.beta}, reference {self.cfg.reference}"
            + (", prompts shared" if self.prefix_sharing else "")
        )

    def train_examples(self) -> PairExamples:
        return self._train

    def eval_examples(self) -> PairExamples:
        return self._eval

    def collate(self, examples: list[PairExample]) -> PairBatch:
        batch = pack_pairs([e.pair for e in examples], prefix_sharing=self.prefix_sharing)
        return dataclasses.replace(
            batch, reference=self.reference.select([(e.split, e.index) for e in examples])
        )

    def units(self, batch: PairBatch) -> int:
        return batch.num_pairs

    def tokens(self, batch: PairBatch) -> int:
        """prompt + chosen plus prompt + rejected tokens, shared or not."""
        return batch.num_tokens

    def prepare(self, model: torch.nn.Module, accelerator: Accelerator) -> None:
        """Dropout off; the reference made ready (the precomputed pass runs here, or is read from cache).

        The loop calls this before it restores a checkpoint, so `model` holds the initial weights; a resumed
        run still loads the reference from its spec when the cache is missing, to depend on nothing else.
        """
        disable_dropout(model)
        mode = self.cfg.reference
        if mode == "online":
            self.reference = self._online_reference(model, accelerator)
        elif mode == "precomputed":
            self.reference = self._precomputed_reference(model, accelerator)
        if accelerator.is_main_process:
            self._write_data_report()

    def loss(self, model: torch.nn.Module, batch: PairBatch) -> StepOutput:
        return preference_step(model, batch, self.reference, self.loss_fn, self.params)

    # --- references ---------------------------------------------------------------------------------------

    def _load_reference(self, accelerator: Accelerator) -> torch.nn.Module:
        from zephyr.models.load import load_model
        from zephyr.training.prepare import weights_dtype

        spec = self.cfg.ref_model or self.cfg.model
        # Whole weights on every process, even under ZeRO-3: a model loaded while its sharded loading is on
        # would come out partitioned, with no engine to gather it for the forward.
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        whole = plugin.zero3_init_context_manager(enable=False) if plugin else contextlib.nullcontext()
        with whole:
            model = load_model(
                spec,
                dtype=weights_dtype(self.cfg),  # as the policy's
                trust_remote_code=self.cfg.trust_remote_code,
                attn_implementation=self.attn_implementation,
            )
        disable_dropout(model)
        return model.to(accelerator.device).eval().requires_grad_(False)

    def _online_reference(self, model: torch.nn.Module, accelerator: Accelerator) -> ref_mod.Reference:
        if self.cfg.ref_model is None and ref_mod.is_peft_model(model):
            return ref_mod.Reference("online", ready=True)  # the policy with its adapters disabled
        return ref_mod.Reference("online", model=self._load_reference(accelerator), ready=True)

    @contextlib.contextmanager
    def _reference_for_pass(
        self, model: torch.nn.Module, accelerator: Accelerator
    ) -> Iterator[torch.nn.Module]:
        if self.cfg.ref_model is None and (not self.resume or ref_mod.is_peft_model(model)):
            with ref_mod.adapters_disabled(model):
                yield model
            return
        loaded = self._load_reference(accelerator)
        try:
            yield loaded
        finally:
            del loaded
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _weights_fingerprint(self, model: torch.nn.Module, accelerator: Accelerator) -> str:
        """The reference weights' fingerprint: of its files, hashed once on the main process (every rank
        reading 14 GB would be slow), else of its tensors."""
        from zephyr.scoring.forward import unwrap_model

        folder = self._reference_folder()
        if folder.is_dir() and any(folder.glob("*.safetensors")):
            memo = self.cache_dir / ref_mod.WEIGHTS_MEMO
            found = [ref_mod.weights_fingerprint(folder, memo) if accelerator.is_main_process else None]
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(found, from_process=0)
            return str(found[0])
        with self._reference_for_pass(
            model, accelerator
        ) as ref:  # no weight files (a hub id): hash the tensors
            return ref_mod.state_dict_fingerprint(unwrap_model(ref))

    def _config_fingerprint(self) -> str:
        """sha256 of the reference folder's config.json; "" for a hub id (its tensors are hashed instead)."""
        config = self._reference_folder() / "config.json"
        return io.file_sha256(config) if config.is_file() else ""

    def _reference_folder(self) -> Path:
        from zephyr.models.load import resolve_model_path

        return Path(resolve_model_path(self.cfg.ref_model or self.cfg.model))

    def _precomputed_reference(self, model: torch.nn.Module, accelerator: Accelerator) -> ref_mod.Reference:
        splits = {"train": self.data.train, "eval": self.data.eval}
        cache_dir = ref_mod.ensure_cache_dir(self.cache_dir)
        key = ref_mod.CacheKey(
            weights=self._weights_fingerprint(model, accelerator),
            template=str(getattr(self.tokenizer, "chat_template", "") or ""),
            max_length=self.cfg.max_length,
            max_prompt_length=self.cfg.max_prompt_length,
            precision=_precision(accelerator, self.cfg),
            device_type=torch.device(accelerator.device).type,
            prefix_sharing=self.prefix_sharing,
            config=self._config_fingerprint(),
        )
        result = ref_mod.precompute(
            {name: pairs for name, pairs in splits.items() if pairs},
            key=key,
            cache_dir=cache_dir,
            reference_model=lambda: self._reference_for_pass(model, accelerator),
            accelerator=accelerator,
            batch_size=REFERENCE_BATCH_FACTOR * self.cfg.per_device_batch_size,
            prefix_sharing=self.prefix_sharing,
        )
        self.reference_status = result.status
        self._cache_files = {name: str(path) for name, path in result.files.items()}
        return ref_mod.Reference("precomputed", tables=result.tables, ready=True)

    def _write_data_report(self) -> None:
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "train_pairs": len(self._train),
            "eval_pairs": len(self._eval),
            "bad_pairs": len(self.stats.bad),
            "bad_examples": self.stats.bad[:20],
            **{k: v for k, v in asdict(self.stats).items() if k.startswith("truncated")},
            "reference": self.cfg.reference,
            "prefix_sharing": self.prefix_sharing,
            "reference_status": self.reference_status,
            "reference_cache": getattr(self, "_cache_files", {}),
            "data_cache": str(self.data.entry.folder),
        }
        (out / DATA_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def run_dpo(cfg: DPOConfig, resume: bool = False):
    """`zephyr dpo`: build the task from the recipe and train (returns the loop's TrainResult)."""
    from zephyr.training.loop import train

    return train(DPOTask(cfg, resume=resume), cfg, resume=resume)


def _precision(accelerator: Accelerator, cfg: DPOConfig) -> str:
    """The reference cache key's precision: the run's autocast, and the weights' dtype when not fp32."""
    mixed = str(getattr(accelerator, "mixed_precision", "no"))
    return mixed if cfg.master_weights == "fp32" else f"{mixed}, bf16 weights"
