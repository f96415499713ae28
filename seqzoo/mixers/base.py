"""The TokenMixer contract, the mixer registry and the notation used everywhere.

Notation legend (shape comments in every file use these letters):

    B  batch            T  time (sequence length)     D  model width
    H  heads            K  key / query dim per head   V  value dim per head
    N  state dim (SSMs) C  chunk length               P  head dim of Mamba2 / SSD
    E  expansion        W  window (sliding attention) L  layers / memory depth

A mixer maps (B, T, D) -> (B, T, D) and owns nothing but token mixing: blocks own the
norms, residuals and MLPs. Its state is explicit and functional: ``forward`` and ``step``
return a *new* state object and never mutate the one passed in, nor keep one in ``self``.

Every mixer declares a pydantic ``Config`` (extra="forbid") with its own hyper-parameters;
structural arguments (``d_model``, ``layer_idx``) are injected by the builder, never given
in a recipe. ``Config.check(d_model)`` raises ``ConfigError`` naming the offending key when
the hyper-parameters cannot work with the model width (e.g. d_model not divisible by heads).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import Tensor, nn

from seqzoo.errors import ConfigError, SeqzooError  # ConfigError re-exported: mixers import it from here
from seqzoo.limits import MAX_HYPERPARAM_INT
from seqzoo.strict_schema import STRICT, first_error, short_repr

State = Any  # a NamedTuple / frozen dataclass of tensors (and ints), one per mixer


class MixerConfig(BaseModel):
    """Base of every mixer's hyper-parameters. ``backend`` is shared by all mixers.
    Strict types (``seqzoo.strict_schema``); every integer hyper-parameter is a size, a count
    or a length and is bounded by ``MAX_HYPERPARAM_INT``."""

    model_config = ConfigDict(**STRICT, frozen=True)

    backend: str = "auto"

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_ints(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_HYPERPARAM_INT:
            raise ValueError(f"expected at most {MAX_HYPERPARAM_INT:,}, got {value}")
        return value

    def check(self, d_model: int) -> None:
        """Raise ``ConfigError(key, why)`` if these settings cannot work at ``d_model``."""

    @staticmethod
    def require_divisible(key: str, value: int, d_model: int) -> None:
        if value <= 0 or d_model % value != 0:
            raise ConfigError(key, f"expected a positive divisor of d_model={d_model}, got {value}")


class TokenMixer(nn.Module):
    """One shallow base class for every mixer. Subclasses set ``name``, ``Config``,
    ``backends`` (kernel names they can use besides "reference") and implement
    ``init_state``, ``forward`` and ``step``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MixerConfig]] = MixerConfig
    backends: ClassVar[tuple[str, ...]] = ()
    # Small hyper-parameter choices the generic invariant tests draw from (hypothesis),
    # e.g. {"n_heads": [1, 2, 4], "chunk_size": [1, 3, 8]}. Values must work at d_model=16.
    test_space: ClassVar[dict[str, list[Any]]] = {}

    def __init__(self, config: MixerConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.layer_idx = layer_idx

    # -- the contract -------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> State:
        raise NotImplementedError

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x: (B, T, D) -> y: (B, T, D) and the state after the last token."""
        raise NotImplementedError

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """x: (B, D) -> y: (B, D); one token of decoding."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------
    def _param_like(self) -> Tensor:
        return next(self.parameters())

    def default_state(self, x: Tensor) -> State:
        return self.init_state(x.shape[0], device=x.device, dtype=x.dtype)

    @property
    def backend(self) -> str:
        """The backend actually used on this module's device and dtype ("reference" on CPU)."""
        return _resolved_backend(self)

    def kernel_limits(self, backend: str) -> str | None:
        """Why ``backend`` cannot compute this mixer's configuration, or None if it can.
        ``auto`` skips such a kernel; asking for it by name is a ConfigError."""
        return None

    def _dtype(self) -> torch.dtype | None:
        try:
            return self._param_like().dtype
        except StopIteration:
            return None

    def _device(self) -> torch.device:
        try:
            return self._param_like().device
        except StopIteration:
            return torch.device("cpu")

    def state_size(self, batch_size: int = 1) -> int:
        """Number of scalars held in the decode state right after ``init_state``."""
        # On the module's own device: a model built on "meta" (shapes only) counts without memory.
        state = self.init_state(batch_size, device=self._device(), dtype=torch.float32)
        return sum(t.numel() for t in iter_tensors(state))

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.config.model_dump().items())
        return f"d_model={self.d_model}, {fields}"


@torch.compiler.assume_constant_result
def _resolved_backend(mixer: TokenMixer) -> str:
    """A constant for torch.compile (resolved once while tracing; no graph break on the
    package imports of the availability check)."""
    from seqzoo.kernels import resolve_backend

    return resolve_backend(mixer.config.backend, mixer.backends, mixer._device(), dtype=mixer._dtype(),
                           limits=mixer.kernel_limits)


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """All tensors inside a (nested) state of tuples / NamedTuples / lists / dataclasses."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from iter_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from iter_tensors(item)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from iter_tensors(getattr(obj, name))


# -- registry ---------------------------------------------------------------------------
_REGISTRY: dict[str, type[TokenMixer]] = {}


def register(cls: type[TokenMixer]) -> type[TokenMixer]:
    """Class decorator: make a mixer buildable by name from recipes and the API."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"mixer name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    import seqzoo.mixers  # noqa: F401  (imports every mixer module, which registers)


def available() -> list[str]:
    """Names of every registered mixer, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get(name: str) -> type[TokenMixer]:
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError("type", f"unknown mixer {short_repr(name)}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def make_config(name: str, params: dict[str, Any], *, d_model: int) -> MixerConfig:
    """Validate ``params`` strictly against mixer ``name``; errors name the key."""
    cls = get(name)
    try:
        config = cls.Config.model_validate(params)
    except ValidationError as err:
        key, msg = first_error(err, allowed_keys=sorted(cls.Config.model_fields))
        if msg.startswith("unknown key"):
            msg = msg.replace("unknown key", f"unknown key for mixer {name!r}", 1)
        raise ConfigError(key or "?", msg) from None
    config.check(d_model)
    return config


def build(name: str, *, d_model: int, layer_idx: int = 0, **params: Any) -> TokenMixer:
    """Build mixer ``name`` at width ``d_model`` from its own hyper-parameters."""
    config = make_config(name, params, d_model=d_model)
    return get(name)(config, d_model=d_model, layer_idx=layer_idx)
