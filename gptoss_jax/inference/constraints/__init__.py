"""Constrained decoding for gpt-oss: Structured Outputs and tool choice, enforced per token.

Requests become llguidance grammars over whole harmony assistant turns (reasoning free, the
final answer or the tool call constrained, harmony's control tokens only where harmony puts
them); a ``ConstraintBatch`` keeps one matcher per engine slot and fills the batch's token
bitmask on the host; ``apply_token_mask`` applies it inside the jitted sampler.

Modules: ``spec`` (what is asked: bodies, tools, turns; ``ConstraintError``), ``request`` (OpenAI
Responses / Chat parameters and the Python API's ``response_format`` -> a constraint, or an
error naming the parameter), ``schema`` (JSON Schema checks), ``grammar`` (the Lark grammars),
``compiled`` (compiled, cached constraints), ``tokenizer`` (o200k_harmony for llguidance),
``batch`` (host masks per slot), ``mask`` (the device side), ``prompt`` (the developer
message's ``# Response Formats`` section).

Engine integration (how a decode loop uses this; see ``batch`` for the per-slot states;
``inference.slot_constraints`` and ``inference.engine`` implement it):

* Before a slot is taken: ``from_responses(request)`` / ``from_chat(request)`` /
  ``generate_constraint(response_format)`` — a ``ConstraintError`` becomes a 400 with its
  ``param``; nothing was allocated. ``developer_section`` goes at the end of the developer
  message (``splice_response_format`` on the rendered prompt).
* On admission: ``batch.attach(slot, rc.constraint)``; on finish or cancel:
  ``batch.release(slot)``. The mask for a fresh matcher is known before prefill, so prefill's
  first token is sampled under ``batch.fill()`` too.
* The decode step takes ``mask`` int32 ``[slots, ceil(vocab / 32)]`` (fixed shape; all ones for
  free and idle slots, so one executable serves every mix) and applies it in the unembedding,
  before the sampler's temperature and filters: the CPU unembedding kernel writes -inf for
  disallowed tokens and takes the argmax of the allowed ones in its one pass; elsewhere
  ``apply_token_mask(logits, mask)`` follows the unembedding (``ops.projection.unembed_greedy``).
* Overlap (``Engine.overlap_fill``, on an accelerator): split the step after the layers.
  Dispatch the layers; while they run, the host ``fill``s (the GIL is released); then dispatch
  the masked unembedding and the sampling. On XLA:CPU the device is the host's own cores, busy
  with the layers, so the fill runs first and the step is one call. A step without a
  constrained row takes no mask.
* After each step: ``consume(slot, token)``; a slot whose ``state`` is ``FAILED`` ends with an
  error status (``error(slot)``) and its token is dropped; ``DONE`` means the turn's stop token
  was just consumed (the engine stops there anyway). ``rollback(slot, k)`` undoes tokens.
"""

from gptoss_jax.inference.constraints.batch import ConstraintBatch, SlotState
from gptoss_jax.inference.constraints.compiled import Constraint, compile_body, compile_turn
from gptoss_jax.inference.constraints.mask import (
    allowed_bits,
    allowed_tokens,
    apply_token_mask,
    is_allowed,
    mask_words,
)
from gptoss_jax.inference.constraints.prompt import (
    response_formats_section,
    splice_response_format,
    with_response_formats,
)
from gptoss_jax.inference.constraints.request import (
    RequestConstraint,
    from_chat,
    from_responses,
    generate_constraint,
    response_format_body,
)
from gptoss_jax.inference.constraints.schema import UNSUPPORTED_KEYWORDS
from gptoss_jax.inference.constraints.spec import (
    Body,
    ConstraintError,
    JsonObject,
    JsonSchema,
    Lark,
    Regex,
    Text,
    Tool,
    TurnSpec,
)
from gptoss_jax.inference.constraints.tokenizer import llg_tokenizer

__all__ = [
    "UNSUPPORTED_KEYWORDS", "Body", "Constraint", "ConstraintBatch", "ConstraintError",
    "JsonObject", "JsonSchema", "Lark", "Regex", "RequestConstraint", "SlotState", "Text", "Tool",
    "TurnSpec", "allowed_bits", "allowed_tokens", "apply_token_mask", "compile_body",
    "compile_turn", "from_chat", "from_responses", "generate_constraint", "is_allowed",
    "llg_tokenizer", "mask_words", "response_format_body", "response_formats_section",
    "splice_response_format", "with_response_formats",
]
