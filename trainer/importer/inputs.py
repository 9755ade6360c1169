"""The importer's inputs: SD1.x single-file checkpoints (.safetensors, or pickled .ckpt/.pt/.pth/.bin
with allow_pickle) and diffusers folders, opened lazily.

Opening one reads only its header (safetensors) or configs (diffusers), names what it is when it is
not SD1.x, and checks its U-Net's tensors against the config its shapes imply. Weights are read when
asked for, one part at a time (`unet()`, `text_encoder_state()`, `vae_state()`), so that importing
N checkpoints holds about one U-Net in memory; a pickled file is read whole (torch.load cannot do
less) and dropped by `release()`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from torch import Tensor

from trainer.importer.errors import ImportFailure
from trainer.importer.weight_files import WeightFile, _Shape, sha256_of
from trainer.io.ldm_ema import ema_unet_names
from trainer.io.sd_checkpoint import (LDM_UNET_PREFIX, _diffusers_weight_files, check_unet_state_dict,
                                      ldm_to_diffusers_unet_state_dict, load_unet_weights)
from trainer.io.sd_text_encoder import (HF_PREFIX, OPEN_CLIP_PREFIX, config_from_hf,
                                        diffusers_text_encoder_files, ldm_text_encoder_names)
from trainer.io.sd_unet_layout import check_ldm_unet, infer_unet_config
from trainer.io.sd_vae import (LDM_VAE_PREFIX, config_from_diffusers, read_diffusers_vae_config,
                               vae_state_dict_from_any)
from trainer.models.text_encoder import HF_POSITION_IDS_KEY, TextEncoderConfig
from trainer.models.unet import UNet2DConditionModel, UNetConfig
from trainer.models.vae import VAEConfig

SD1_TEXT_WIDTH = 768


# ---------------------------------------------------------------------------------------------
# What a checkpoint is


def other_family(names: Iterable[str], shapes: Mapping[str, _Shape]) -> Optional[str]:
    """'an SDXL checkpoint', 'an SD2.x checkpoint', … when the tensor names say it is not SD1.x."""
    names = list(names)
    starts = lambda *prefixes: any(n.startswith(prefixes) for n in names)  # noqa: E731
    if starts("conditioner.embedders.") or LDM_UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        return "an SDXL checkpoint"
    if starts(LDM_UNET_PREFIX + "joint_blocks.", "joint_blocks.", "text_encoders."):
        return "an SD3 checkpoint"
    if starts("double_blocks.", "single_blocks.", LDM_UNET_PREFIX + "double_blocks."):
        return "a Flux checkpoint"
    if starts("lora_unet_", "lora_te_", "lora_te1_") or any(".lora_" in n or "lora_down" in n for n in names):
        return "a LoRA (it changes a checkpoint; it is none)"
    if starts(OPEN_CLIP_PREFIX):
        return "an SD2.x checkpoint (OpenCLIP text encoder)"
    attn = LDM_UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if attn in shapes and shapes[attn].shape[1] == 1024:
        return "an SD2.x checkpoint (1024-wide text context)"
    return None


def _not_sd1(display: str, what: str) -> ImportFailure:
    return ImportFailure(f"{display}: this is {what}; only SD1.x is supported")


class Checkpoint:
    """One input: its id stem, format, U-Net config, and its parts' weights on request."""

    path: str
    format: str
    display: str
    has_text_encoder: bool
    has_vae: bool

    def unet_config(self, sample_size: Optional[int]) -> UNetConfig:
        raise NotImplementedError

    def unet_state(self, config: UNetConfig) -> Dict[str, Tensor]:
        """The U-Net's tensors under diffusers names, as stored (float16 stays float16), checked against
        `config` (ImportFailure naming what is missing or misshapen)."""
        raise NotImplementedError

    def unet(self, config: UNetConfig) -> UNet2DConditionModel:
        """The U-Net with its weights (float32): the checkpoint's tensors put into a meta-device model."""
        return load_unet_weights(UNet2DConditionModel(config, device="meta"), self.unet_state(config)).eval()

    def text_encoder_state(self) -> Tuple[Dict[str, Tensor], Optional[TextEncoderConfig]]:
        """(HF-named tensors, the config when the source states one)."""
        raise NotImplementedError

    def vae_state(self) -> Tuple[Dict[str, Tensor], Optional[VAEConfig]]:
        raise NotImplementedError

    def sha256(self) -> str:
        raise NotImplementedError

    def release(self) -> None:
        pass

    @property
    def stem(self) -> str:
        """The file name without its extension, or the folder's name."""
        name = os.path.basename(self.path.rstrip(os.sep))
        return os.path.splitext(name)[0] if os.path.isfile(self.path) else name


def _check_unet_kind(display: str, config: UNetConfig) -> None:
    if config.in_channels != 4 or config.out_channels != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(config.in_channels, "an unusual")
        raise ImportFailure(f"{display}: this is {kind} checkpoint ({config.in_channels} input channels); only "
                            f"text-to-image SD1.x checkpoints (4 latent channels) are supported")
    width = set(config.cross_attention_dims())
    if width == {1024}:
        raise _not_sd1(display, "an SD2.x checkpoint (1024-wide text context)")


def _checked(display: str, config: UNetConfig, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    try:
        check_unet_state_dict(UNet2DConditionModel(config, device="meta"), state)
    except ValueError as e:
        raise ImportFailure(f"{display}: unet weights: {str(e).splitlines()[0]}") from None
    return state


class SingleFile(Checkpoint):
    format = "single-file"

    def __init__(self, path: str, allow_pickle: bool):
        self.path = path
        self.file = WeightFile(path, allow_pickle)
        self.display = self.file.display
        shapes = self.file.shapes
        family = other_family(shapes, shapes)
        if family:
            raise _not_sd1(self.display, family)
        unet = {k[len(LDM_UNET_PREFIX):]: k for k in shapes if k.startswith(LDM_UNET_PREFIX)}
        if not unet:
            unet = ema_unet_names(shapes)  # EMA-only: model_ema.diffusion_model… without dots
        if not unet:
            if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in shapes):
                raise ImportFailure(f"{self.display}: this is a VAE, not a checkpoint; pass it with --vae")
            raise ImportFailure(f"{self.display}: no SD1.x U-Net in it (no {LDM_UNET_PREFIX}* tensors); only SD1.x "
                                f"single-file checkpoints and diffusers folders are supported")
        self.unet_names = unet  # LDM name (no prefix) -> name in the file
        self.ema = not any(k.startswith(LDM_UNET_PREFIX) for k in shapes)
        self.text_names = ldm_text_encoder_names(shapes)  # HF name -> name in the file
        self.has_text_encoder = bool(self.text_names)
        self.vae_names = [n for n in shapes if n.startswith(LDM_VAE_PREFIX)]
        self.has_vae = bool(self.vae_names)
        ldm_shapes = {ldm: shapes[name] for ldm, name in unet.items()}
        try:
            config = infer_unet_config(ldm_shapes)
            _check_unet_kind(self.display, config)
            check_ldm_unet(ldm_shapes, config)
        except ValueError as e:
            raise ImportFailure(f"{self.display}: {e}") from None
        self._config = config

    def unet_config(self, sample_size: Optional[int]) -> UNetConfig:
        return UNetConfig(**{**self._config.__dict__, "sample_size": sample_size})

    def unet_state(self, config: UNetConfig) -> Dict[str, Tensor]:
        raw = self.file.load(self.unet_names.values())
        ldm = {ldm: raw.pop(name) for ldm, name in self.unet_names.items()}
        state = ldm_to_diffusers_unet_state_dict(ldm, config)
        del ldm
        return _checked(self.display, config, state)

    def text_encoder_state(self) -> Tuple[Dict[str, Tensor], Optional[TextEncoderConfig]]:
        raw = self.file.load(self.text_names.values())
        return {hf: raw[name] for hf, name in self.text_names.items()}, None

    def vae_state(self) -> Tuple[Dict[str, Tensor], Optional[VAEConfig]]:
        return vae_state_dict_from_any(self.file.load(self.vae_names)), None

    def sha256(self) -> str:
        return sha256_of([self.path])

    def release(self) -> None:
        self.file.release()


class DiffusersFolder(Checkpoint):
    format = "diffusers"

    def __init__(self, path: str, allow_pickle: bool):
        self.path = path
        self.display = os.path.basename(path.rstrip(os.sep)) + "/"
        sub = lambda *p: os.path.join(path, *p)  # noqa: E731
        if os.path.isdir(sub("transformer")):
            raise _not_sd1(self.display, "a transformer-based pipeline (SD3, Flux, PixArt…)")
        if os.path.isdir(sub("text_encoder_2")) or (os.path.isfile(sub("unet", "config.json")) and self._unet_json().get(
                "addition_embed_type") == "text_time"):
            raise _not_sd1(self.display, "an SDXL pipeline")
        if not os.path.isfile(sub("unet", "config.json")):
            if os.path.isfile(sub("unet", "model.onnx")):
                raise ImportFailure(f"{self.display}: this is an ONNX export (Optimum); list it in manifest.json as an "
                                    f"expert with \"path\" (docs/model-package.md) instead of importing it")
            raise ImportFailure(f"{self.display}: not a diffusers folder (no unet/config.json)")
        try:
            try:
                self.unet_files = _diffusers_weight_files(sub("unet"), None)
            except FileNotFoundError:  # a folder with only the fp16 variant (diffusion_pytorch_model.fp16.*)
                self.unet_files = _diffusers_weight_files(sub("unet"), "fp16")
            self.text_files = diffusers_text_encoder_files(sub("text_encoder")) \
                if os.path.isdir(sub("text_encoder")) else []
            self.vae_config, self.vae_file = read_diffusers_vae_config(sub("vae")) \
                if os.path.isdir(sub("vae")) else (None, None)
        except FileNotFoundError as e:
            raise ImportFailure(f"{self.display}: {e}") from None
        files = self.unet_files + self.text_files + ([self.vae_file] if self.vae_file else [])
        self.weight_files = {f: WeightFile(f, allow_pickle) for f in files}  # refuses pickles early
        try:
            self._config = UNetConfig.from_dict(self._unet_json())
        except (ValueError, TypeError) as e:
            raise ImportFailure(f"{self.display}: unsupported unet/config.json ({e})") from None
        _check_unet_kind(self.display, self._config)
        self.has_text_encoder = bool(self.text_files)
        self.has_vae = self.vae_file is not None
        if self.has_text_encoder:
            with open(sub("text_encoder", "config.json"), encoding="utf-8") as f:
                self.text_config = config_from_hf(json.load(f))
            if self.text_config.hidden_size != SD1_TEXT_WIDTH and self._config.cross_attention_dim == 1024:
                raise _not_sd1(self.display, "an SD2.x pipeline")

    def _unet_json(self) -> dict:
        with open(os.path.join(self.path, "unet", "config.json"), encoding="utf-8") as f:
            return json.load(f)

    def unet_config(self, sample_size: Optional[int]) -> UNetConfig:
        return UNetConfig(**{**self._config.__dict__, "sample_size": sample_size})

    def _load(self, files: List[str]) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for f in files:
            wf = self.weight_files[f]
            out.update(wf.load(list(wf.shapes)))
            wf.release()
        return out

    def unet_state(self, config: UNetConfig) -> Dict[str, Tensor]:
        return _checked(self.display, config, self._load(self.unet_files))

    def text_encoder_state(self) -> Tuple[Dict[str, Tensor], Optional[TextEncoderConfig]]:
        state = self._load(self.text_files)
        state = {k if k.startswith(HF_PREFIX) else HF_PREFIX + k: v for k, v in state.items()}
        state.pop(HF_POSITION_IDS_KEY, None)
        return state, self.text_config

    def vae_state(self) -> Tuple[Dict[str, Tensor], Optional[VAEConfig]]:
        state = vae_state_dict_from_any(self._load([self.vae_file]))
        return state, config_from_diffusers(self.vae_config) if self.vae_config else None

    def sha256(self) -> str:
        return sha256_of(self.unet_files)


def open_input(path: str, allow_pickle: bool) -> Checkpoint:
    """A checkpoint file or a diffusers folder, checked to be SD1.x (ImportFailure otherwise)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return DiffusersFolder(path, allow_pickle)
    if not os.path.isfile(path):
        raise ImportFailure(f"{path}: no such file or folder")
    return SingleFile(path, allow_pickle)


def open_vae(path: str, allow_pickle: bool) -> Tuple[str, Dict[str, Tensor], Optional[VAEConfig]]:
    """(how to name it, diffusers-named VAE tensors, config if stated) from --vae: a standalone VAE file
    (LDM or diffusers names), a full checkpoint (its VAE), a diffusers `vae/` folder or pipeline folder."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
        try:
            config, weights = read_diffusers_vae_config(folder)
        except FileNotFoundError as e:
            raise ImportFailure(f"--vae {path}: {e}") from None
        wf = WeightFile(weights, allow_pickle)
        state = vae_state_dict_from_any(wf.load(list(wf.shapes)))
        return weights, state, config_from_diffusers(config) if config else None
    if not os.path.isfile(path):
        raise ImportFailure(f"--vae {path}: no such file or folder")
    wf = WeightFile(path, allow_pickle)
    names = [n for n in wf.shapes if n.startswith(LDM_VAE_PREFIX)] or \
        [n for n in wf.shapes if n.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]
    if not names:
        raise ImportFailure(f"--vae {wf.display}: no VAE tensors in it (encoder.*, decoder.*, or first_stage_model.*)")
    return path, vae_state_dict_from_any(wf.load(names)), None
