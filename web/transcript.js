// The two-sided transcript: one bubble per user utterance and per agent turn, updated in place
// as interim text firms up, as the agent's words are spoken, and when the agent is interrupted.

export class Transcript {
  constructor(list, emptyNote) {
    this.list = list;
    this.emptyNote = emptyNote;
    this.user = new Map(); // utterance_id -> bubble
    this.agent = new Map(); // turn -> bubble
    this.entries = []; // {role, id, text, final, interrupted, latencyMs} — also read by tests
  }

  _bubble(role, id) {
    const map = role === "user" ? this.user : this.agent;
    let b = map.get(id);
    if (b) return b;
    this.emptyNote?.remove();
    const li = document.createElement("li");
    li.className = `msg ${role} interim`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Rejoinder";
    const text = document.createElement("p");
    text.className = "text";
    const meta = document.createElement("div");
    meta.className = "meta";
    li.append(who, text, meta);
    this.list.append(li);
    const entry = { role, id, text: "", final: false, interrupted: false, latencyMs: null };
    this.entries.push(entry);
    b = { li, text, meta, entry };
    map.set(id, b);
    return b;
  }

  _scroll() {
    const box = this.list.parentElement;
    if (box) box.scrollTop = box.scrollHeight;
  }

  userText(utteranceId, text, final) {
    if (!text && !final) return;
    const b = this._bubble("user", utteranceId);
    if (final && !text.trim()) {
      // The recogniser decided it was nothing: drop the interim bubble rather than leave it hanging.
      b.li.remove();
      this.user.delete(utteranceId);
      this.entries = this.entries.filter((e) => e !== b.entry);
      return;
    }
    b.text.textContent = text;
    b.li.classList.toggle("interim", !final);
    b.li.classList.toggle("final", final);
    Object.assign(b.entry, { text, final });
    this._scroll();
  }

  agentText(turn, text, final, interrupted) {
    // Turn numbers are the user's turns, so things the agent says on its own (the greeting, an
    // operator's "say") can reuse one: a turn whose bubble is already final starts a new bubble.
    if (this.agent.get(turn)?.entry.final && !final) this.agent.delete(turn);
    const b = this._bubble("agent", turn);
    b.text.textContent = text;
    b.li.classList.toggle("interim", !final);
    b.li.classList.toggle("final", final);
    Object.assign(b.entry, { text, final });
    if (interrupted) this.markInterrupted(turn);
    this._scroll();
  }

  markInterrupted(turn) {
    const b = this.agent.get(turn);
    if (!b || b.entry.interrupted) return;
    b.entry.interrupted = true;
    b.li.classList.add("interrupted");
    const tag = document.createElement("span");
    tag.className = "tag cut";
    tag.textContent = "interrupted";
    tag.title = "You spoke while the agent was talking; it stopped and kept only what it had said.";
    b.meta.prepend(tag);
  }

  latency(turn, metrics) {
    const v2v = metrics.voice_to_voice_s;
    if (v2v == null) return;
    const b = this._bubble("agent", turn);
    const ms = Math.round(v2v * 1000);
    b.entry.latencyMs = ms;
    let chip = b.meta.querySelector(".latency-chip");
    if (!chip) {
      chip = document.createElement("span");
      chip.className = "tag latency-chip";
      b.meta.append(chip);
    }
    chip.textContent = `${ms} ms`;
    chip.dataset.grade = ms <= 600 ? "good" : ms <= 900 ? "ok" : "slow";
    const stage = (k, label) => (metrics[k] == null ? null : `${label} ${Math.round(metrics[k] * 1000)} ms`);
    chip.title = [
      "Voice to voice: from the end of your speech to the first audio of the answer.",
      stage("asr_final_s", "transcript"),
      stage("end_of_turn_s", "turn end"),
      stage("llm_first_token_s", "first word thought"),
      stage("first_tts_audio_s", "first audio synthesised"),
    ].filter(Boolean).join("\n");
  }

  system(text) {
    this.emptyNote?.remove();
    const li = document.createElement("li");
    li.className = "msg system";
    li.textContent = text;
    this.list.append(li);
    this._scroll();
  }
}
