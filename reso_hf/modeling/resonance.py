"""The resonant components of ResoLLM (SPEC §3.1–§3.4).

Self-contained (copied into checkpoints): only torch and relative imports.
"""

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from .primes import first_primes

GOLDEN_RATIO = (1 + math.sqrt(5)) / 2

# Phasor frequencies span slow to fast rotations of ln n; with ln p in [0.69, ~14] for 32k-100k
# vocabularies the slowest component turns less than one radian and the fastest thousands.
PRIME_CODE_MIN_FREQUENCY = 0.05
PRIME_CODE_MAX_FREQUENCY = 30.0


# ---------------------------------------------------------------------------------------------
# §3.1 Prime phasor code
# ---------------------------------------------------------------------------------------------


def prime_code_frequencies(num_frequencies: int) -> torch.Tensor:
    """The K fixed, log-spaced frequencies f_k of the phasor code (float64)."""
    return torch.logspace(
        math.log10(PRIME_CODE_MIN_FREQUENCY), math.log10(PRIME_CODE_MAX_FREQUENCY), num_frequencies,
        dtype=torch.float64,
    )


def prime_phasor(n, num_frequencies: int) -> torch.Tensor:
    """Complex phasor code ``c(n)_k = exp(2*pi*i * f_k * ln n)`` of positive integers ``n`` (complex128).

    ``n`` is a tensor or a Python int of any size (products of many primes overflow int64).
    Because the phase is linear in ``ln n``, ``c(a*b) = c(a) * c(b)`` elementwise.
    """
    if isinstance(n, int):
        log_n = torch.tensor(math.log(n), dtype=torch.float64).unsqueeze(-1)
    else:
        log_n = torch.log(n.to(torch.float64)).unsqueeze(-1)
    return torch.polar(torch.ones_like(log_n), 2 * math.pi * prime_code_frequencies(num_frequencies) * log_n)


def prime_code_table(vocab_size: int, code_dim: int) -> torch.Tensor:
    """Real [cos, sin] code of each token's prime, shape (vocab_size, code_dim), float32."""
    primes = torch.tensor(first_primes(vocab_size), dtype=torch.float64)
    phasor = prime_phasor(primes, code_dim // 2)
    return torch.cat([phasor.real, phasor.imag], dim=-1).to(torch.float32)


class ResoLLMPrimeCode(nn.Module):
    """Adds ``W_p [cos, sin](c(p_i))`` to the token embedding (the fixed code table is a buffer)."""

    def __init__(self, vocab_size: int, code_dim: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.code_dim = code_dim
        self.code_table = nn.Buffer(prime_code_table(vocab_size, code_dim), persistent=False)
        self.proj = nn.Linear(code_dim, hidden_size, bias=False)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        codes = nn.functional.embedding(input_ids, self.code_table)
        return self.proj(codes.to(self.proj.weight.dtype))

    def resize(self, vocab_size: int) -> None:
        """Code the primes of a resized vocabulary (token i keeps the i-th prime, new tokens get the next ones)."""
        self.vocab_size = vocab_size
        self.code_table = prime_code_table(vocab_size, self.code_dim).to(self.code_table.device)


class ResoLLMTokenEmbedding(nn.Embedding):
    """The token embedding plus the projected prime code of each token (SPEC §3.1), as one module: what
    `get_input_embeddings()(input_ids)` returns is exactly what the decoder layers receive, so `inputs_embeds`,
    soft prompts and prompt tuning see the prime code too."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, prime_code: ResoLLMPrimeCode,
                 **factory_kwargs):
        super().__init__(num_embeddings, embedding_dim, padding_idx, **factory_kwargs)
        self.prime_code = prime_code

    @classmethod
    def around(cls, embedding: nn.Embedding, prime_code: ResoLLMPrimeCode) -> "ResoLLMTokenEmbedding":
        """Wrap a plain embedding (e.g. the one `resize_token_embeddings` builds), sharing its weight."""
        wrapped = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, prime_code,
                      device="meta")
        wrapped.weight = embedding.weight
        return wrapped

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        embeddings = super().forward(input_ids)
        if isinstance(embeddings, DTensor):
            # Tensor parallelism: the vocabulary-parallel lookup gives per-rank partial sums over replicated ids;
            # the prime code is computed whole on every rank, so it joins as a replicated term.
            local_ids = input_ids.to_local() if isinstance(input_ids, DTensor) else input_ids
            codes = DTensor.from_local(self.prime_code(local_ids), embeddings.device_mesh, [Replicate()],
                                       run_check=False)
            return embeddings.redistribute(placements=[Replicate()]) + codes
        return embeddings + self.prime_code(input_ids)


# ---------------------------------------------------------------------------------------------
# §3.2 Rotary spectra
# ---------------------------------------------------------------------------------------------


def rotary_inverse_frequencies(spectrum: str, num_pairs: int, head_dim: int, theta: float) -> torch.Tensor:
    """Angular frequencies of the rotary pairs.

    "geometric": the standard RoPE ``theta^(-2j/head_dim)``.
    "golden": wavelengths ``lambda_j = 2*pi * phi^j``, so frequencies ``phi^-j``: consecutive ratios are
    irrational and no two components re-align, a quasi-periodic position code.
    """
    j = torch.arange(num_pairs, dtype=torch.float64)
    if spectrum == "geometric":
        inv_freq = theta ** (-2 * j / head_dim)
    elif spectrum == "golden":
        inv_freq = GOLDEN_RATIO ** (-j)
    else:
        raise ValueError(f"rope_spectrum={spectrum!r} is invalid: expected one of ('geometric', 'golden')")
    return inv_freq.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# §3.3 Kuramoto phase synchronisation
# ---------------------------------------------------------------------------------------------


class ResoLLMKuramoto(nn.Module):
    """One causal Kuramoto coupling step per layer.

    Natural phases ``theta_t = W_theta h_t`` (one per key/value head) are pulled toward the running
    mean field ``z_t = mean_{s<=t} exp(i theta_s)`` (padding excluded):
    ``theta'_t = theta_t + K_h r_t sin(psi_t - theta_t)`` with ``r_t sin(psi_t - theta_t) = Im(z_t e^{-i theta_t})``.

    Computed in real arithmetic (cos and sin parts), which torch.compile and torch.export trace everywhere.
    The running sums ``[sum cos theta_s, sum sin theta_s, count]`` per position, (B, H_kv, T, 3) float32, are
    returned so the caller keeps them in the KV cache, where they crop, reorder and batch-select exactly like
    keys and values.
    """

    def __init__(self, hidden_size: int, num_key_value_heads: int, coupling_init: float):
        super().__init__()
        self.phase_proj = nn.Linear(hidden_size, num_key_value_heads, bias=False)
        self.coupling = nn.Parameter(torch.full((num_key_value_heads,), float(coupling_init)))
        self.coupling_init = coupling_init

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor,
        previous_sums: torch.Tensor | None,
        segment_starts: torch.Tensor | None = None,
    ):
        """Returns ``(cos theta', sin theta', order parameter r, running sums)``.

        hidden_states (B, T, d); token_mask (B, T) with 1 for real tokens; previous_sums (B, H_kv, 1, 3) the
        cached running sums at the last cached position, or None at the start of a sequence; segment_starts
        (B, T) bool marks the first token of each packed document: the mean field restarts there, so no phase
        information crosses a document boundary. cos/sin/r are (B, H_kv, T).
        """
        theta = self.phase_proj(hidden_states).float().transpose(1, 2)  # (B, H, T)
        mask = token_mask.to(torch.float32)[:, None, :]  # (B, 1, T)
        cos, sin = theta.cos(), theta.sin()
        phasor = torch.stack([cos * mask, sin * mask, mask.expand_as(theta)], dim=-1)  # padding contributes 0
        sums = phasor.cumsum(dim=2)
        if previous_sums is not None:
            sums = sums + previous_sums
        if segment_starts is not None:
            sums = _restart_at_segments(sums, phasor, segment_starts)
        sum_cos, sum_sin, count = sums.unbind(-1)
        count = count.clamp(min=1.0)
        # r sin(psi - theta) = Im(z e^{-i theta}) = (S_sin cos theta - S_cos sin theta) / n; zero on padding.
        # Dividing once by n (not the two means) keeps the per-token op count low: decode runs this per layer.
        pull = (sum_sin * cos - sum_cos * sin) * (mask / count)
        coupled = theta + self.coupling.float()[:, None] * pull
        order = torch.hypot(sum_cos, sum_sin) / count
        return coupled.cos(), coupled.sin(), order, sums


def _restart_at_segments(sums, phasor, segment_starts):
    """Subtract, from each running sum, its value just before the latest segment start at or before t.

    Branch-free (no data-dependent Python `if`), so it is always applied: where no segment starts after
    the first token, it subtracts exactly zero."""
    positions = torch.arange(segment_starts.shape[-1], device=segment_starts.device)
    latest_start = torch.where(segment_starts, positions, -1).cummax(dim=-1).values  # (B, T)
    has_start = (latest_start >= 0)[:, None, :, None]
    index = latest_start.clamp(min=0)[:, None, :, None].expand(-1, sums.shape[1], -1, sums.shape[-1])
    base = (sums - phasor).gather(2, index)
    return sums - base * has_start


# ---------------------------------------------------------------------------------------------
# §3.4 Coherence gating
# ---------------------------------------------------------------------------------------------


class ResoLLMCoherenceGate(nn.Module):
    """Scales an MLP output ``u_t`` by ``g_t = sigmoid(k (c_t - tau))`` with ``c_t = sigmoid(w.u_t + b)``.

    The outer sigmoid is centred on the threshold tau and sharpened by k, so the gate spans (almost)
    the whole of [0, 1]: fully closed for incoherent tokens, fully open for coherent ones.
    """

    # Bias at init: c = sigmoid(2) = 0.88 > tau, so a fresh gate is nearly open and training starts
    # from an ordinary transformer block.
    INITIAL_BIAS = 2.0

    def __init__(self, hidden_size: int, threshold: float, sharpness: float, normalized: bool = False):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        self.threshold = threshold
        self.sharpness = sharpness
        self.normalized = normalized
        self._initial_gates = {}

    def _gate(self, score: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.sharpness * (torch.sigmoid(score) - self.threshold))

    def forward(self, mlp_output: torch.Tensor):
        score = self.score(mlp_output)
        gate = self._gate(score)
        if self.normalized:
            # Divide by the gate of the initial score (computed the same way, so a gate at its initial score is
            # exactly 1): it starts as a no-op yet, unlike a saturated gate, passes a gradient. Range [0, ~1.03].
            gate = gate / self._initial_gate(score)
        return mlp_output * gate, gate.squeeze(-1)

    def _initial_gate(self, score: torch.Tensor) -> torch.Tensor:
        """The gate at the initial score, in `score`'s dtype and device; a constant, so kept rather than recomputed
        by five kernels per layer and decoded token."""
        key = (score.dtype, score.device, self.threshold, self.sharpness)
        if key not in self._initial_gates:
            with torch.no_grad():
                initial = torch.full((1, 1, 1), self.INITIAL_BIAS, dtype=score.dtype, device=score.device)
                self._initial_gates[key] = self._gate(initial)
        return self._initial_gates[key]

    @torch.no_grad()
    def start_as_identity(self) -> None:
        """With `normalized`, a gate of exactly 1 for every input: score weight 0, bias the initial score."""
        self.score.weight.zero_()
        self.score.bias.fill_(self.INITIAL_BIAS)


# ---------------------------------------------------------------------------------------------
# §3.5 PRSC concept bank
# ---------------------------------------------------------------------------------------------


class ResoLLMConceptBank(nn.Module):
    """Per-token attention over M learned concept slots plus the user's bound concepts:
    ``h_t += W_o softmax(q(h_t) K^T / sqrt(d)) V``. No mixing across positions, so causal by construction.

    A bound concept's key is the projection ``code_proj`` of its prime phasor code, so composing two
    concepts (product of primes = product of phasors, SPEC §3.1) gives the key of the composite.
    """

    def __init__(self, hidden_size: int, num_slots: int, code_dim: int):
        super().__init__()
        self.scale = hidden_size**-0.5
        self.code_dim = code_dim
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.keys = nn.Parameter(torch.empty(num_slots, hidden_size))
        self.values = nn.Parameter(torch.empty(num_slots, hidden_size))
        self.output = nn.Linear(hidden_size, hidden_size, bias=False)
        self.code_proj = nn.Linear(code_dim, hidden_size, bias=False)

    def key_of_phasor(self, phasor: torch.Tensor) -> torch.Tensor:
        """Slot key of a complex phasor code (K,) -> (hidden,)."""
        code = torch.cat([phasor.real, phasor.imag]).to(self.code_proj.weight)
        return self.code_proj(code)

    def forward(self, hidden_states: torch.Tensor, bound_keys=None, bound_values=None) -> torch.Tensor:
        keys, values = self.keys, self.values
        if bound_keys is not None:
            keys = torch.cat([keys, bound_keys.to(keys)], dim=0)
            values = torch.cat([values, bound_values.to(values)], dim=0)
        weights = torch.softmax(self.query(hidden_states) @ keys.T * self.scale, dim=-1)
        return hidden_states + self.output(weights @ values)
