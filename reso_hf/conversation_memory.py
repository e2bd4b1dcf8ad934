"""Conversation memory layers: a small adapter trained online from one conversation, kept per session on disk.

A memory layer is one PEFT adapter (named "memory" by default) added next to whatever the model already holds: a
plain LoRA (`peft.LoraConfig`) or a DynamicLoRA adapter holding only its fastest tier, "context" (session scope,
§5.1). PEFT cannot mix adapter types in one model, so on a model that already carries adapters the memory takes
their type; those adapters stay active and frozen while the memory trains.

Online training. After each turn (user message u_t, assistant answer a_t) the layer takes `steps_per_turn` Adam
steps on the loss

    L = sum_i w_i * L_i / sum_i w_i,        w_i = decay ** (t - i)        (recency weighting; age t - i in turns)

over the last `window` turns i <= t, where L_i is the mean next-token loss on turn i's assistant tokens only (each
turn formatted alone with the chat template, labels as in SFT: `reso_hf.training.data.tokenize_messages` with
assistant_only=True). Replaying older turns with smaller weights keeps what they taught while the newest turn
dominates.

Per session (a folder `memory_dir/<session>/`):
  adapter_model.safetensors, adapter_config.json   the adapter in PEFT's layout (loadable by PeftModel.from_pretrained)
  memory.json                                      the manifest: format, version, session, adapter type, centroid
                                                   (prompt embedding, list of floats), importance, loss_reduction,
                                                   uses, turns, created / updated (ISO 8601 UTC), training settings
Every file is written atomically, the manifest last: a folder without a valid manifest is not a memory layer.

  centroid      mean over the session's turns of `prompt_embedding(user + "\\n" + assistant)` (the router's signal in
                reso_hf.adapter_composition: mean input token embedding minus the embedding matrix's mean);
  importance    loss_reduction * (1 + uses): loss_reduction is the sum over turns of (loss of the turn's assistant
                tokens before its training steps - after them), in nats per token, i.e. what the layer learned;
                uses counts how often the layer was loaded back (`load`, retrieval in the chat);
  retrieve(p)   the saved layers ranked by cosine(prompt_embedding(p), centroid);
  prune(N)      keeps the N saved layers of highest importance (ties: the most recently updated) and deletes the
                others (renamed to a hidden folder first, so a crash never leaves a half-deleted layer visible).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Optional

import torch

from .adapter_composition import prompt_embedding
from .dynamic_lora.serialization import atomic_save_safetensors, atomic_write_json, load_safetensors
from .training.data import IGNORE_INDEX, resolve_chat_template, tokenize_messages

MANIFEST_NAME = "memory.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
MANIFEST_FORMAT = "reso_hf.conversation_memory"
MANIFEST_VERSION = 1
ADAPTER_TYPES = ("auto", "lora", "dynamic_lora")
_SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def recency_weights(turns: int, decay: float) -> list[float]:
    """w_i = decay ** (turns - 1 - i) for turns i = 0 .. turns-1 (the newest turn has weight 1)."""
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 0:
        raise ValueError(f"turns must be a non-negative int, got {turns!r}.")
    _check_decay(decay)
    return [float(decay) ** (turns - 1 - i) for i in range(turns)]


def _check_decay(decay) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(f"decay must be a number in (0, 1] (1: no recency weighting), got {decay!r}.")


def _positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be an int >= 1, got {value!r}.")
    return value


def _positive_float(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_session_name(name) -> str:
    if not isinstance(name, str) or not _SESSION_NAME.match(name):
        raise ValueError(f"session must be 1-128 characters out of letters, digits, '_', '.', '-', not starting with "
                         f"'.', '_' or '-', got {name!r}.")
    return name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_config(config) -> dict:
    """A PEFT config as JSON, as PEFT's own save_pretrained writes it (sets become sorted lists)."""
    payload = config.to_dict()
    for key, value in payload.items():
        if isinstance(value, set):
            payload[key] = sorted(value)
    return json.loads(json.dumps(payload, default=str))


class ConversationMemory:
    """A memory layer for one conversation at a time (see the module docstring for the definitions).

    Example:

        ```py
        >>> memory = ConversationMemory(model, tokenizer, "memories", steps_per_turn=4, lr=3e-4, rank=8, layers=8)
        >>> memory.observe_turn("My cat is called Pimble.", "Nice: your cat is called Pimble.")
        >>> memory.save()                      # memories/<session>/: adapter + memory.json
        >>> memory.retrieve("What is my cat's name?")   # [(session, cosine), ...], best first
        >>> memory.load(session)               # the layer of an earlier session, to continue or to use
        >>> memory.model.generate(...)         # the PeftModel with the memory layer active
        ```

    Args:
        model: a transformers causal LM (a PEFT adapter is added to it) or a `peft.PeftModel` with LoRA or DynamicLoRA
            adapters (the memory becomes one more adapter of the same type, active together with the others).
        tokenizer: the model's tokenizer (needs offsets, i.e. a fast tokenizer, to find the assistant tokens).
        memory_dir: folder of the saved sessions (created on the first save).
        steps_per_turn: optimizer steps after each turn.
        lr: Adam learning rate of the memory layer (4 steps at 3e-4 on the last 8 layers: the setting chosen on the
            dev facts of benchmarks/memory_layers.py for SmolLM2-135M).
        rank: rank of the LoRA adapter, or of the DynamicLoRA context tier.
        decay: recency decay in (0, 1]: turn i's loss gets weight decay ** (age in turns).
        window: how many of the latest turns are replayed at each step.
        max_layers: how many saved layers `prune()` keeps.
        adapter_type: "lora", "dynamic_lora" (an adapter with only the context tier) or "auto" (the type of the
            model's adapters, "lora" for a model without any).
        target_modules: modules to adapt (PEFT's notation); None: "all-linear" (PEFT's choice: every linear layer of
            the decoder, not the output head).
        layers: decoder layers that get the memory: None (all), an int k (the last k layers: the backward pass then
            stops there, so a step costs much less) or a list of layer indices.
        chat_template: "auto", "model" or "guanaco", as in SFT (`reso_hf.training.data.resolve_chat_template`).
        max_length: tokens kept per turn (longer turns are cut).
        session: name of the new session; None: a name from the UTC time and a random suffix.
        adapter_name: name of the memory adapter in the PeftModel.
        seed: seeds the initialisation of the layer (A factors).
    """

    def __init__(self, model, tokenizer, memory_dir: str, steps_per_turn: int = 4, lr: float = 3e-4, rank: int = 8,
                 decay: float = 0.8, window: int = 8, max_layers: int = 8, adapter_type: str = "auto",
                 target_modules=None, layers=None, chat_template: str = "auto", max_length: int = 512,
                 session: Optional[str] = None, adapter_name: str = "memory", seed: int = 0):
        if not isinstance(memory_dir, (str, os.PathLike)) or not str(memory_dir):
            raise ValueError(f"memory_dir must be a folder path, got {memory_dir!r}.")
        if os.path.exists(memory_dir) and not os.path.isdir(memory_dir):
            raise ValueError(f"memory_dir {str(memory_dir)!r} exists and is not a folder.")
        if adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type must be one of {list(ADAPTER_TYPES)}, got {adapter_type!r}.")
        _check_decay(decay)
        self.memory_dir = str(memory_dir)
        self.tokenizer = tokenizer
        self.steps_per_turn = _positive_int(steps_per_turn, "steps_per_turn")
        self.lr = _positive_float(lr, "lr")
        self.rank = _positive_int(rank, "rank")
        self.decay = float(decay)
        self.window = _positive_int(window, "window")
        self.max_layers = _positive_int(max_layers, "max_layers")
        self.max_length = _positive_int(max_length, "max_length")
        self.template = resolve_chat_template(tokenizer, chat_template)
        if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
            raise ValueError(f"adapter_name must be a Python identifier (it names torch modules), got "
                             f"{adapter_name!r}.")
        self.adapter_name = adapter_name
        self.target_modules = "all-linear" if target_modules is None else target_modules
        self.layers = self._layer_indices(model, layers)
        if self.layers is not None:  # PEFT refuses layers_to_transform with "all-linear": name the modules instead
            self.target_modules = self._modules_in_layers(model, self.target_modules, self.layers)
        self.model, self.adapter_type, self.others = self._attach(model, adapter_type, seed)
        self.parameters = [p for n, p in self.model.named_parameters() if f".{adapter_name}." in n
                           or n.endswith(f".{adapter_name}")]
        if not self.parameters:
            raise ValueError(f"the memory adapter {adapter_name!r} has no parameters on this model.")
        from peft import get_peft_model_state_dict

        self._initial = {k: v.detach().clone() for k, v in
                         get_peft_model_state_dict(self.model, adapter_name=adapter_name).items()}
        self.new_session(session)

    # ----- the adapter --------------------------------------------------------------------------------------------
    @staticmethod
    def _layer_indices(model, layers) -> Optional[list[int]]:
        if layers is None:
            return None
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        count = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, bool) or not isinstance(layers, (int, list, tuple, range)):
            raise ValueError(f"layers must be None, an int (the last k layers) or a list of layer indices, got "
                             f"{layers!r}.")
        if isinstance(layers, int):
            if count is None or not 1 <= layers <= count:
                raise ValueError(f"layers={layers} must be between 1 and the model's num_hidden_layers ({count}).")
            return list(range(count - layers, count))
        indices = sorted(set(layers))
        if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                              or (count is not None and i >= count) for i in indices):
            raise ValueError(f"layers must be decoder layer indices in [0, {count}), got {list(layers)!r}.")
        return indices

    @staticmethod
    def _modules_in_layers(model, target_modules, layers: list[int]) -> list[str]:
        """Full names of the linear modules of `layers` that `target_modules` selects (PEFT's suffix match for a
        list; "all-linear": all of them). Adapter-internal modules of a PeftModel are skipped."""
        from transformers.pytorch_utils import Conv1D

        from .adapter_composition import decoder_layer_index

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        chosen = []
        for name, module in base.named_modules():
            if not isinstance(module, (torch.nn.Linear, Conv1D)) or decoder_layer_index(name) not in layers:
                continue
            if re.search(r"\.(lora_[AB]|dynamic_lora_[AB])\.", name):
                continue
            name = name.removesuffix(".base_layer")  # a module that already carries an adapter
            if target_modules == "all-linear" or (not isinstance(target_modules, str) and any(
                    name == t or name.endswith("." + t) for t in target_modules)):
                chosen.append(name)
        if not chosen:
            raise ValueError(f"target_modules={target_modules!r} selects no linear module in layers {layers}.")
        return chosen

    def _memory_config(self, adapter_type: str):
        if adapter_type == "lora":
            from peft import LoraConfig

            return LoraConfig(r=self.rank, lora_alpha=self.rank, lora_dropout=0.0, target_modules=self.target_modules,
                              task_type="CAUSAL_LM")
        from .dynamic_lora import DynamicLoraConfig

        # Only the context tier, trained by this class's own optimizer: the tier dynamics (inertia, migration) are
        # for the Trainer callback and stay off.
        return DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=self.target_modules, tiers=["context"],
                                 tier_ranks={"context": self.rank}, tier_alpha={"context": float(self.rank)},
                                 dynamics_enabled=False)

    def _attach(self, model, adapter_type: str, seed: int):
        from peft import PeftModel, get_peft_model

        from .adapter_algebra import adapter_kind

        if isinstance(model, PeftModel):
            others = list(model.active_adapters)
            kinds = {adapter_kind(model, name) for name in model.peft_config}
            existing = "lora" if kinds == {"LORA"} else "dynamic_lora"
            if adapter_type == "auto":
                adapter_type = existing
            elif adapter_type != existing:
                raise ValueError(f"adapter_type={adapter_type!r} but the model's adapters are {sorted(kinds)}: PEFT "
                                 f"cannot mix adapter types in one model; use adapter_type='auto'.")
            if self.adapter_name in model.peft_config:
                raise ValueError(f"the model already has an adapter named {self.adapter_name!r}; pass another "
                                 f"adapter_name.")
            torch.manual_seed(seed)
            model.add_adapter(self.adapter_name, self._memory_config(adapter_type))
        else:
            others = []
            adapter_type = "lora" if adapter_type == "auto" else adapter_type
            torch.manual_seed(seed)
            model = get_peft_model(model, self._memory_config(adapter_type), adapter_name=self.adapter_name)
        model.base_model.set_adapter([*others, self.adapter_name], inference_mode=True)
        model.eval()
        return model, adapter_type, others

    def _activate(self) -> None:
        """Memory and the other adapters active; only the memory's parameters trainable."""
        self.model.base_model.set_adapter([*self.others, self.adapter_name], inference_mode=True)
        for parameter in self.parameters:
            parameter.requires_grad_(True)

    @contextmanager
    def disabled(self):
        """The model without the memory layer inside the block (its other adapters stay active)."""
        if self.others:
            self.model.base_model.set_adapter(self.others, inference_mode=True)
            try:
                yield self.model
            finally:
                self._activate()
        else:
            with self.model.disable_adapter():
                yield self.model

    def _state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = self._initial
        if set(tensors) != set(expected):
            missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"the saved memory layer does not fit this model's memory adapter: missing tensors "
                             f"{missing[:3]}, unexpected {unexpected[:3]}.")
        for key, tensor in tensors.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"the saved memory layer does not fit: {key} has shape {tuple(tensor.shape)}, the "
                                 f"memory adapter {tuple(expected[key].shape)} (rank {self.rank}).")
        set_peft_model_state_dict(self.model, tensors, adapter_name=self.adapter_name)

    # ----- sessions -------------------------------------------------------------------------------------------------
    def new_session(self, session: Optional[str] = None) -> str:
        """Start a fresh layer (the adapter's initial weights) for a new conversation; returns its name."""
        if session is None:
            session = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        self.session = check_session_name(session)
        self._set_state(self._initial)
        self._activate()
        self.turns: list[tuple[list[int], list[int]]] = []
        self.turn_count = 0
        self.embedding_sum: Optional[torch.Tensor] = None
        self.loss_reduction = 0.0
        self.uses = 0
        self.created = _now()
        self.updated = self.created
        self.optimizer = torch.optim.Adam(self.parameters, lr=self.lr)
        return self.session

    @property
    def centroid(self) -> Optional[torch.Tensor]:
        return None if self.embedding_sum is None else self.embedding_sum / self.turn_count

    @property
    def importance(self) -> float:
        return self.loss_reduction * (1 + self.uses)

    def session_path(self, session: str) -> str:
        return os.path.join(self.memory_dir, check_session_name(session))

    # ----- online training ------------------------------------------------------------------------------------------
    def encode_turn(self, user: str, assistant: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one turn alone: labels only on the assistant tokens (as in SFT)."""
        for field, text in (("user", user), ("assistant", assistant)):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{field} must be a non-empty str, got {text!r}.")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        ids, labels = tokenize_messages(self.tokenizer, messages, self.template, assistant_only=True)
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise ValueError(f"the turn has no assistant token within max_length={self.max_length}.")
        return ids, labels

    def _batch(self, turns):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        length = max(len(ids) for ids, _ in turns)
        input_ids = torch.full((len(turns), length), pad, dtype=torch.long)
        labels = torch.full((len(turns), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(turns), length), dtype=torch.long)
        for row, (ids, labs) in enumerate(turns):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(labs)] = torch.tensor(labs)
            mask[row, :len(ids)] = 1
        device = self.model.get_input_embeddings().weight.device
        return input_ids.to(device), labels.to(device), mask.to(device)

    def turn_losses(self, turns) -> torch.Tensor:
        """(len(turns),) mean next-token loss on each turn's labelled (assistant) tokens, with gradients."""
        input_ids, labels, mask = self._batch(turns)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                   ignore_index=IGNORE_INDEX, reduction="none")
        counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        return losses.sum(dim=1) / counts

    def weighted_loss(self, turns) -> torch.Tensor:
        """The recency-weighted loss of the module docstring over `turns` (oldest first)."""
        weights = torch.tensor(recency_weights(len(turns), self.decay))
        losses = self.turn_losses(turns)
        weights = weights.to(losses.device)
        return (weights * losses).sum() / weights.sum()

    def observe_turn(self, user: str, assistant: str) -> dict:
        """Train the layer on one more turn; returns {"turn", "loss_before", "loss_after"} (this turn's loss)."""
        turn = self.encode_turn(user, assistant)
        self._activate()
        with torch.no_grad():
            before = float(self.turn_losses([turn])[0])
        self.turns.append(turn)
        replay = self.turns[-self.window:]
        for _ in range(self.steps_per_turn):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.weighted_loss(replay)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the memory loss became {float(loss)} at turn {self.turn_count + 1}; "
                                         f"lower lr (now {self.lr}).")
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            after = float(self.turn_losses([turn])[0])
        self.turns = self.turns[-self.window:]
        embedding = self.embed(f"{user}\n{assistant}")
        self.embedding_sum = embedding if self.embedding_sum is None else self.embedding_sum + embedding
        self.turn_count += 1
        self.loss_reduction += before - after
        self.updated = _now()
        return {"turn": self.turn_count, "loss_before": before, "loss_after": after}

    def embed(self, text: str) -> torch.Tensor:
        """(hidden,) the prompt embedding of `text` (reso_hf.adapter_composition.prompt_embedding)."""
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            raise ValueError("cannot embed an empty text.")
        device = self.model.get_input_embeddings().weight.device
        return prompt_embedding(self.model, ids.to(device))[0].cpu()

    # ----- persistence ----------------------------------------------------------------------------------------------
    def manifest(self) -> dict:
        centroid = self.centroid
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "session": self.session,
            "adapter_type": self.adapter_type,
            "rank": self.rank,
            "centroid": None if centroid is None else [float(v) for v in centroid.tolist()],
            "importance": self.importance,
            "loss_reduction": self.loss_reduction,
            "uses": self.uses,
            "turns": self.turn_count,
            "created": self.created,
            "updated": self.updated,
            "training": {"steps_per_turn": self.steps_per_turn, "lr": self.lr, "decay": self.decay,
                         "window": self.window},
        }

    def save(self) -> str:
        """Write the current session's folder (adapter, config, then the manifest); returns its path."""
        if self.turn_count == 0:
            raise ValueError("nothing to save: the session has no turn yet (call observe_turn first).")
        folder = self.session_path(self.session)
        os.makedirs(folder, exist_ok=True)
        atomic_save_safetensors(os.path.join(folder, WEIGHTS_NAME), self._state(), metadata={"format": "pt"})
        atomic_write_json(os.path.join(folder, CONFIG_NAME), _json_config(self.model.peft_config[self.adapter_name]))
        atomic_write_json(os.path.join(folder, MANIFEST_NAME), self.manifest())
        return folder

    def read_manifest(self, session: str) -> dict:
        path = os.path.join(self.session_path(session), MANIFEST_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"no memory layer {session!r} in {self.memory_dir!r} (no {MANIFEST_NAME}); saved "
                             f"sessions: {self.sessions()}.")
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path} is not a memory manifest of version {MANIFEST_VERSION} (format "
                             f"{MANIFEST_FORMAT!r}); got format {manifest.get('format')!r}, version "
                             f"{manifest.get('version')!r}.")
        return manifest

    def sessions(self) -> list[str]:
        """Names of the saved layers (folders with a manifest)."""
        if not os.path.isdir(self.memory_dir):
            return []
        return sorted(name for name in os.listdir(self.memory_dir) if _SESSION_NAME.match(name)
                      and os.path.isfile(os.path.join(self.memory_dir, name, MANIFEST_NAME)))

    def load(self, session: str, count_use: bool = True) -> dict:
        """Make a saved layer the current one (its weights, statistics and name): later turns continue it.
        `count_use` adds one to its use count (importance). Returns its manifest."""
        manifest = self.read_manifest(session)
        if manifest["adapter_type"] != self.adapter_type or manifest["rank"] != self.rank:
            raise ValueError(f"memory layer {session!r} is a {manifest['adapter_type']} adapter of rank "
                             f"{manifest['rank']}; this memory uses {self.adapter_type} of rank {self.rank}.")
        self._set_state(load_safetensors(os.path.join(self.session_path(session), WEIGHTS_NAME)))
        self._activate()
        self.session = session
        self.turns = []  # the texts are not stored: later turns replay only what was said after loading
        self.turn_count = int(manifest["turns"])
        centroid = manifest["centroid"]
        self.embedding_sum = None if centroid is None else torch.tensor(centroid) * self.turn_count
        self.loss_reduction = float(manifest["loss_reduction"])
        self.uses = int(manifest["uses"]) + (1 if count_use else 0)
        self.created, self.updated = manifest["created"], manifest["updated"]
        self.optimizer = torch.optim.Adam(self.parameters, lr=self.lr)
        if count_use:
            atomic_write_json(os.path.join(self.session_path(session), MANIFEST_NAME),
                              {**manifest, "uses": self.uses, "importance": self.importance})
        return self.read_manifest(session)

    def retrieve(self, prompt: str, top_k: Optional[int] = None) -> list[tuple[str, float]]:
        """Saved layers ranked by cosine(prompt embedding, layer centroid), best first: [(session, cosine), ...]."""
        if top_k is not None:
            _positive_int(top_k, "top_k")
        query = torch.nn.functional.normalize(self.embed(prompt), dim=0)
        ranked = []
        for session in self.sessions():
            centroid = self.read_manifest(session)["centroid"]
            if centroid is not None:
                vector = torch.nn.functional.normalize(torch.tensor(centroid), dim=0)
                ranked.append((session, float(query @ vector)))
        ranked.sort(key=lambda item: -item[1])
        return ranked if top_k is None else ranked[:top_k]

    def prune(self, max_layers: Optional[int] = None) -> list[str]:
        """Delete all but the `max_layers` (default: the constructor's) most important saved layers; returns the
        deleted sessions."""
        keep = self.max_layers if max_layers is None else _positive_int(max_layers, "max_layers")
        manifests = [self.read_manifest(s) for s in self.sessions()]
        manifests.sort(key=lambda m: (m["importance"], m["updated"], m["session"]), reverse=True)
        removed = [m["session"] for m in manifests[keep:]]
        for session in removed:
            trash = os.path.join(self.memory_dir, f".pruned-{session}-{uuid.uuid4().hex[:6]}")
            os.replace(self.session_path(session), trash)  # atomic: the layer disappears at once
            shutil.rmtree(trash)
        return removed
