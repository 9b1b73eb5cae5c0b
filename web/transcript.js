// The two-sided transcript: one bubble per user utterance and per agent turn, updated in place
// as interim text firms up, as the agent's words are spoken, and when the agent is interrupted.

export class Transcript {
  constructor(list, emptyNote) {
    this.list = list;
    this.emptyNote = emptyNote;
    this.user = new Map(); // utterance_id -> bubble
    this.agent = new Map(); // turn -> bubble
    this.entries = []; // {role, id, text, final, interrupted, latencyMs, source?, pending?} — also read by tests
    this.remoteTyped = 0; // typed turns that were not typed here
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
      this.entries.splice(this.entries.indexOf(b.entry), 1); // in place: the page's view holds this array
      return;
    }
    b.text.textContent = text;
    b.li.classList.toggle("interim", !final);
    b.li.classList.toggle("final", final);
    Object.assign(b.entry, { text, final });
    this._scroll();
  }

  /** A message typed in the page's box, shown at once as "sending" until the server takes it. */
  typedPending(key, text) {
    const b = this._bubble("user", `typed:${key}`);
    b.li.classList.remove("interim");
    b.li.classList.add("typed", "pending");
    b.text.textContent = text;
    const tag = document.createElement("span");
    tag.className = "tag typed-tag";
    tag.textContent = "sending…";
    b.meta.append(tag);
    Object.assign(b.entry, { text, final: false, source: "text", pending: true, echoed: false, key });
    this._scroll();
  }

  /**
   * A typed turn taken by the server: its `control_result` (`key`: the message's control id), or
   * its `transcript` event with source "text" (no key), whichever comes first. The event settles
   * the oldest message sent here with that text that it has not settled yet; one typed elsewhere
   * (another client, an operator's user_text) gets a bubble of its own.
   */
  typedConfirmed(text, key = null) {
    const same = (e) => (key !== null ? e.key === key : !e.echoed && e.text.trim() === text.trim());
    const entry = this.entries.find((e) => e.role === "user" && e.source === "text" && same(e));
    const id = entry ? `typed:${entry.key}` : `typed-remote:${++this.remoteTyped}`;
    const b = this._bubble("user", id);
    b.li.classList.remove("interim", "pending");
    b.li.classList.add("typed", "final");
    b.text.textContent = text;
    let tag = b.meta.querySelector(".typed-tag");
    if (!tag) {
      tag = document.createElement("span");
      tag.className = "tag typed-tag";
      b.meta.append(tag);
    }
    tag.textContent = "typed";
    Object.assign(b.entry, { text, final: true, source: "text", pending: false });
    if (key === null) b.entry.echoed = true;
    this._scroll();
  }

  /** A typed message the server refused: its bubble goes (the page puts the text back in the box). */
  typedRefused(key) {
    const id = `typed:${key}`;
    const b = this.user.get(id);
    if (!b) return;
    b.li.remove();
    this.user.delete(id);
    this.entries.splice(this.entries.indexOf(b.entry), 1);
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
