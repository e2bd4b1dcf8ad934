"""Interactive chat session (the seed's `interactive_session`, and `reso-hf chat`).

Reads lines from a text stream (stdin by default) and writes to another (stdout). Commands:

- ``exit``: end the session (end of input does the same);
- ``goal <description>``: create a goal on the model for the next response (agency, SPEC §3.6);
- ``status``: print the model, its switches and extensions, the stability of the last generation,
  the suggested temperature and the active goals;
- ``metrics``: toggle the one-line metrics shown after each response;
- ``memory``: with a conversation memory (``reso-hf chat --memory DIR``), its session, turns and the saved layers.

Any other non-empty line is a user message: the conversation so far is formatted with the tokenizer's
chat template (when it has one) and the model's answer is printed as ``Assistant: <text>``. Errors of a
command (bad goal, missing agency) are printed as ``error: <message>`` and the session goes on.

With a `ConversationMemory` (reso_hf.conversation_memory), the first message recalls the saved memory layer whose
centroid is closest to it (cosine >= `memory_min_similarity`; else a new session starts), and after every answer the
layer trains on the turn, is saved into its session folder and the saved layers are pruned to the most important.

Any causal LM works (also with a PEFT adapter); stability, the ResoLLM switches and goals are shown
only for a ResoLLM, the others get the model line and the token count / time of each answer.
"""

import sys
from collections import Counter

from .inference import describe_model, generate_result

COMMANDS_HELP = "commands: exit | goal <description> | status | metrics"
MEMORY_HELP = " | memory"
STEPS_SHOWN = 5


def summarize_warnings(warnings: list[dict]) -> str:
    """One line for the telemetry warnings of an answer: the count of each type, with the steps of the state
    changes (`entered_*`, `stopped_*`); the per-step early warnings (`predicted_*`) are counted only."""
    counts = Counter(warning["type"] for warning in warnings)
    parts = []
    for kind, count in counts.items():
        steps = [w["step"] for w in warnings if w["type"] == kind]
        if kind.startswith(("entered_", "stopped_")):
            shown = ", ".join(str(step) for step in steps[:STEPS_SHOWN]) + (", ..." if count > STEPS_SHOWN else "")
            parts.append(f"{kind.replace('_', ' ')} x{count} (step{'s' if count > 1 else ''} {shown})")
        elif kind.startswith("predicted_"):
            parts.append(f"{kind.replace('_', ' ')} x{count}")
        else:  # one-off notices (e.g. a reduced max_length): their own message
            parts += [w["message"] for w in warnings if w["type"] == kind]
    return "warnings: " + "; ".join(parts)


class ChatSession:
    def __init__(self, engine, show_metrics: bool = True, max_new_tokens: int = 128, input_stream=None,
                 output_stream=None, use_chat_template: bool = True, memory=None, memory_min_similarity: float = 0.5,
                 resume_session: bool = False):
        self.engine = engine
        self.memory = memory
        self.memory_min_similarity = float(memory_min_similarity)
        self.memory_settled = resume_session  # True: the session is chosen, no recall at the first message
        self.show_metrics = bool(show_metrics)
        self.max_new_tokens = max_new_tokens
        self.input = input_stream if input_stream is not None else sys.stdin
        self.output = output_stream if output_stream is not None else sys.stdout
        self.use_chat_template = use_chat_template and getattr(engine.tokenizer, "chat_template", None) is not None
        self.history: list[dict] = []
        self.last_result = None
        self.pending_goal: str | None = None
        self.notice = None
        context = getattr(engine.model.config, "max_position_embeddings", None)
        if context is not None and self.max_new_tokens > context // 2:  # else every answer is cut, with a warning
            self.notice = (f"max_new_tokens {self.max_new_tokens} -> {context // 2}: the model's context is {context} "
                           f"tokens, and half of it is kept for the conversation")
            self.max_new_tokens = context // 2

    def say(self, text: str) -> None:
        print(text, file=self.output, flush=True)

    def run(self) -> int:
        title = "ResoLLM" if self.engine.reso_model is not None else describe_model(self.engine.model)
        self.say(f"{title} chat. {COMMANDS_HELP}{MEMORY_HELP if self.memory is not None else ''}")
        if self.notice:
            self.say(self.notice)
        for raw in self.input:
            if not self.handle(raw.strip()):
                break
        self.say("bye")
        return 0

    def handle(self, line: str) -> bool:
        """Process one input line; False ends the session."""
        if not line:
            return True
        command, _, argument = line.partition(" ")
        if command == "exit":
            return False
        if command == "status":
            self.say(self.status())
        elif command == "metrics":
            self.show_metrics = not self.show_metrics
            self.say(f"metrics display: {'on' if self.show_metrics else 'off'}")
        elif command == "goal":
            self.set_goal(argument)
        elif command == "memory" and self.memory is not None:
            self.say(self.memory_status())
        else:
            self.respond(line)
        return True

    def set_goal(self, description: str) -> None:
        try:
            self.engine.create_goal(description)
        except ValueError as error:
            self.say(f"error: {error}")
            return
        self.pending_goal = description.strip()
        self.say(f"goal set: {self.pending_goal}")

    def _prompt(self, message: str) -> str:
        if not self.use_chat_template:
            return message
        conversation = self.history + [{"role": "user", "content": message}]
        return self.engine.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def respond(self, message: str) -> None:
        if self.memory is not None and not self.memory_settled:
            self.recall(message)
        prompt = self._prompt(message)
        # Keep the most recent turns that fit in the context together with the answer.
        context = getattr(self.engine.model.config, "max_position_embeddings", None)
        limit = float("inf") if context is None else context - self.max_new_tokens
        while self.history and len(self.engine.tokenizer(prompt)["input_ids"]) > limit:
            self.history = self.history[2:]
            prompt = self._prompt(message)
        engine = self.engine
        result = generate_result(engine.model, engine.tokenizer, prompt, self.max_new_tokens,
                                 **engine._sampling({}))
        self.last_result = result
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": result.text}]
        self.pending_goal = None
        self.say(f"Assistant: {result.text.strip()}")
        if self.show_metrics:
            self.say(result.metrics_line())
            if result.warnings:
                self.say(f"  {summarize_warnings(result.warnings)}")
        if self.memory is not None:
            self.remember(message, result.text)

    # ----- conversation memory ----------------------------------------------------------------------------------
    def recall(self, message: str) -> None:
        """First message of a session: continue the closest saved layer, or start a new one."""
        memory = self.memory
        self.memory_settled = True
        ranked = memory.retrieve(message, top_k=1)
        if ranked and ranked[0][1] >= self.memory_min_similarity:
            session, similarity = ranked[0]
            memory.load(session)
            self.say(f"[memory] recalled session {session} (cosine {similarity:.2f}, {memory.turn_count} turns)")
        else:
            best = f"; closest cosine {ranked[0][1]:.2f} < {self.memory_min_similarity:.2f}" if ranked else ""
            self.say(f"[memory] new session {memory.session}{best}")

    def remember(self, message: str, answer: str) -> None:
        memory = self.memory
        try:
            stats = memory.observe_turn(message, answer)
        except ValueError as error:  # e.g. an empty answer: nothing to learn from, the chat goes on
            self.say(f"[memory] turn not learned: {error}")
            return
        memory.save()
        removed = memory.prune()
        line = (f"[memory] session {memory.session}, turn {stats['turn']}: assistant loss "
                f"{stats['loss_before']:.3f} -> {stats['loss_after']:.3f}")
        if removed:
            line += f"; pruned {', '.join(removed)}"
        self.say(line)

    def memory_status(self) -> str:
        memory = self.memory
        saved = memory.sessions()
        return (f"memory: session {memory.session}, {memory.turn_count} turns, importance {memory.importance:.3f}; "
                f"{len(saved)} saved layer{'s' if len(saved) != 1 else ''} in {memory.memory_dir} "
                f"(max {memory.max_layers})")

    def status(self) -> str:
        model = self.engine.reso_model
        if model is None:
            return self.plain_status()
        config = model.config
        parameters = sum(p.numel() for p in self.engine.model.parameters())
        extensions = " ".join(
            f"{name}={'on' if getattr(config, name).enabled else 'off'}"
            for name in ("stability", "stochastic_resonance", "agency", "prsc", "temporal_smf", "entanglement")
        )
        temperature = self.engine.temperature
        lines = [
            f"model: {describe_model(self.engine.model)} ({parameters:,} parameters, {config.num_hidden_layers} "
            f"layers, hidden {config.hidden_size}, vocab {config.vocab_size})",
            f"components: prime_embedding={config.prime_embedding} rope_spectrum={config.rope_spectrum} "
            f"kuramoto={config.kuramoto} coherence_gating={config.coherence_gating}",
            f"extensions: {extensions}",
            f"stability: {model.get_stability():.2f} ({model.get_stability_class()}, "
            f"lambda={model._last_lyapunov():.4f}); suggested temperature: "
            f"{model.get_suggested_temperature(temperature):.2f} (current {temperature:.2f})",
        ]
        get_active_goals = getattr(model, "get_active_goals", None)
        if get_active_goals is None:
            lines.append("goals: unavailable (agency is not in this version)")
        else:
            goals = get_active_goals()
            described = ", ".join(f"{g.description} ({g.progress:.0%})" for g in goals) if goals else "none"
            lines.append(f"goals: {described}")
        lines.append(self.session_line())
        return "\n".join(lines)

    def plain_status(self) -> str:
        """`status` for a model without ResoLLM telemetry: what it is and how the session stands."""
        model = self.engine.model
        config = model.config
        parameters = sum(p.numel() for p in model.parameters())
        shape = ", ".join(f"{label} {getattr(config, name)}" for name, label in
                          (("num_hidden_layers", "layers"), ("hidden_size", "hidden"), ("vocab_size", "vocab"))
                          if getattr(config, name, None) is not None)
        return "\n".join([
            f"model: {describe_model(model)} ({parameters:,} parameters, {shape})",
            "stability, ResoLLM switches and goals: unavailable (the model is not a ResoLLM)",
            self.session_line(),
        ])

    def session_line(self) -> str:
        return f"metrics display: {'on' if self.show_metrics else 'off'}; turns: {len(self.history) // 2}"
