// The page: wires the call (rtc.js) to the controls, the transcript, the meters and the messages.
import { AgentCall, CallError } from "./rtc.js";
import { Transcript } from "./transcript.js";

const $ = (id) => document.getElementById(id);
const ui = {
  connect: $("connect"),
  connectLabel: $("connect-label"),
  mute: $("mute"),
  muteLabel: $("mute-label"),
  status: $("status"),
  statusText: $("status-text"),
  orb: $("orb"),
  hint: $("stage-hint"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  toast: $("toast"),
  audio: $("remote-audio"),
  token: $("token"),
  settings: $("settings"),
  settingsToggle: $("settings-toggle"),
  sessionId: $("session-id"),
  micLevel: $("mic-level"),
  agentLevel: $("agent-level"),
  latLast: $("lat-last"),
  latMedian: $("lat-median"),
  latTurns: $("lat-turns"),
  composer: $("composer"),
  sayText: $("say-text"),
  saySend: $("say-send"),
  sayError: $("say-error"),
};

const transcript = new Transcript($("transcript"), $("empty-note"));
const latencies = [];
let call = null;
let meters = null;

// What the page knows, in one place: the UI renders from it and tests read it (window.rejoinder).
const view = {
  phase: "idle", // idle | connecting | live | ended
  agentState: null, // the session's state event: listening | user_speaking | thinking | speaking
  sessionId: null,
  muted: false,
  agentMuted: false, // the agent's voice silenced here because you talked over it (rtc.js agentAudioGate)
  agentAudio: [], // its last changes: {muted, reason, at (performance.now() ms), elementMuted}
  error: null,
  events: {},
  stats: {},
  bargeIns: 0,
  channelOpen: false, // the data channel: typed messages (and every control command) go over it
  typed: [], // typed messages sent: {id, text, status: "sending" | "ok" | "refused", error}
  typedError: null, // why the last typed message was refused, as shown under the box
  transcript: transcript.entries,
  latenciesMs: latencies,
};
window.rejoinder = {
  view,
  get transcript() {
    return transcript.entries;
  },
  control: (cmd, args) => call?.control(cmd, args) ?? 0,
};

const STATE_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  listening: "Listening",
  user_speaking: "Hearing you",
  thinking: "Thinking…",
  speaking: "Speaking",
  ended: "Call ended",
};

function render() {
  const shown = view.phase === "live" ? view.agentState || "listening" : view.phase;
  ui.status.dataset.state = shown;
  ui.orb.dataset.state = shown;
  ui.statusText.textContent = (view.muted && view.phase === "live" ? "Muted · " : "") + (STATE_TEXT[shown] || shown);
  const live = view.phase === "live" || view.phase === "connecting";
  ui.connect.classList.toggle("danger", live);
  ui.connectLabel.textContent = live ? "Hang up" : "Start talking";
  ui.connect.disabled = false;
  ui.mute.disabled = view.phase !== "live";
  ui.mute.setAttribute("aria-pressed", String(view.muted));
  ui.mute.classList.toggle("on", view.muted);
  ui.muteLabel.textContent = view.muted ? "Unmute" : "Mute";
  ui.sessionId.textContent = view.sessionId ? `session ${view.sessionId.slice(0, 8)}` : "";
  const canType = view.phase === "live" && view.channelOpen;
  ui.sayText.disabled = !canType;
  ui.saySend.disabled = !canType || !ui.sayText.value.trim();
  ui.sayText.placeholder = canType ? "Type a message (Enter to send)" : view.phase === "connecting" || view.phase === "live"
    ? "Connecting…" : "Start a call to type a message";
  ui.sayError.hidden = !view.typedError;
  ui.sayError.textContent = view.typedError || "";
  document.body.dataset.phase = view.phase;
}

function showError(message) {
  view.error = message;
  ui.bannerText.textContent = message;
  ui.banner.hidden = false;
}

function clearError() {
  view.error = null;
  ui.banner.hidden = true;
}

let toastTimer = null;
function toast(message, kind = "info") {
  ui.toast.textContent = message;
  ui.toast.dataset.kind = kind;
  ui.toast.hidden = false;
  ui.toast.classList.remove("show");
  void ui.toast.offsetWidth; // restart the animation
  ui.toast.classList.add("show");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (ui.toast.hidden = true), 2600);
}

function onAgentEvent(ev) {
  view.events[ev.type] = (view.events[ev.type] || 0) + 1;
  switch (ev.type) {
    case "session_started":
      view.sessionId = ev.session_id || view.sessionId;
      break;
    case "state":
      view.agentState = ev.new;
      break;
    case "transcript":
      if (ev.source === "text") transcript.typedConfirmed(ev.text || "");
      else transcript.userText(ev.utterance_id ?? "u", ev.text || "", !!ev.final);
      break;
    case "control_result":
      onControlResult(ev);
      break;
    case "agent_text":
      transcript.agentText(ev.turn, ev.text || "", !!ev.final, !!ev.interrupted);
      break;
    case "barge_in":
      if (ev.outcome === "interruption") {
        view.bargeIns += 1;
        transcript.markInterrupted(ev.turn);
        ui.orb.classList.remove("cut");
        void ui.orb.offsetWidth;
        ui.orb.classList.add("cut");
        const ms = ev.reaction_s != null ? ` in ${Math.round(ev.reaction_s * 1000)} ms` : "";
        toast(`Interrupted — the agent stopped${ms} and is listening`, "cut");
      }
      break;
    case "metrics":
      if (ev.voice_to_voice_s != null) {
        latencies.push(Math.round(ev.voice_to_voice_s * 1000));
        transcript.latency(ev.turn, ev);
        renderLatency();
      }
      break;
    case "error":
      if (ev.fatal) showError(`The agent hit a problem: ${ev.message}`);
      else toast(`Problem in ${ev.where || "the agent"}: ${ev.message}`, "warn");
      break;
    case "session_ended":
      transcript.system(`Conversation ended (${ev.reason || "done"}).`);
      // The agent hung up (time limit, "end" command): the call is over on this side too.
      call?.hangUp("ended by the agent");
      call = null;
      view.phase = "ended";
      ui.hint.textContent = "The agent ended the call. Press Start talking to begin a new conversation.";
      break;
    default:
      break;
  }
  render();
}

// --- typed messages ---------------------------------------------------------------------------------

function sendTyped() {
  const text = ui.sayText.value.trim();
  if (!text || !call) return;
  const id = call.sendText(text);
  if (!id) {
    view.typedError = "Not connected yet: the message was not sent.";
    render();
    return;
  }
  view.typedError = null;
  view.typed.push({ id, text, status: "sending", error: null });
  transcript.typedPending(id, text);
  ui.sayText.value = "";
  fitComposer();
  render();
}

function onControlResult(ev) {
  const sent = view.typed.find((t) => t.id === ev.id);
  if (!sent) return;
  if (ev.ok) {
    sent.status = "ok";
    transcript.typedConfirmed(sent.text, sent.id); // settles it if the transcript event did not
    return;
  }
  // Refused (too long, on hold…): say why, and give the text back so nothing typed is lost.
  sent.status = "refused";
  sent.error = String(ev.error || "refused").replace(/^user_text: /, "");
  view.typedError = `Your message was not sent: ${sent.error}`;
  transcript.typedRefused(sent.id);
  if (!ui.sayText.value) ui.sayText.value = sent.text;
  fitComposer();
}

function fitComposer() {
  ui.sayText.style.height = "auto";
  ui.sayText.style.height = `${Math.min(ui.sayText.scrollHeight + 2, 140)}px`;
}

function renderLatency() {
  const n = latencies.length;
  ui.latTurns.textContent = String(n);
  if (!n) return;
  const sorted = [...latencies].sort((a, b) => a - b);
  const median = n % 2 ? sorted[(n - 1) / 2] : Math.round((sorted[n / 2 - 1] + sorted[n / 2]) / 2);
  ui.latLast.textContent = `${latencies[n - 1]} ms`;
  ui.latMedian.textContent = `${median} ms`;
}

class Meters {
  // Level meters from the audio itself (not the server's say-so), so a silent line is visible.
  constructor() {
    this.ctx = new (window.AudioContext || window.webkitAudioContext)();
    this.mic = null;
    this.agent = null;
    this.running = true;
    const tick = () => {
      if (!this.running) return;
      this._draw(this.mic, ui.micLevel);
      const agentLevel = this._draw(this.agent, ui.agentLevel);
      ui.orb.style.setProperty("--level", agentLevel.toFixed(3));
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }

  attach(which, stream) {
    const src = this.ctx.createMediaStreamSource(stream);
    const an = this.ctx.createAnalyser();
    an.fftSize = 512;
    src.connect(an);
    this[which] = { an, buf: new Float32Array(an.fftSize) };
    this.ctx.resume().catch(() => {});
  }

  _draw(m, el) {
    if (!m) {
      el.style.width = "0%";
      return 0;
    }
    m.an.getFloatTimeDomainData(m.buf);
    let sum = 0;
    for (const v of m.buf) sum += v * v;
    const level = Math.min(1, Math.sqrt(sum / m.buf.length) * 6);
    el.style.width = `${(level * 100).toFixed(1)}%`;
    return level;
  }

  close() {
    this.running = false;
    this.ctx.close().catch(() => {});
  }
}

async function connect() {
  clearError();
  view.phase = "connecting";
  view.agentState = null;
  view.muted = false;
  view.agentMuted = false;
  view.channelOpen = false;
  view.typedError = null;
  ui.audio.muted = false;
  render();
  const token = ui.token.value.trim();
  sessionStorage.setItem("rejoinder-token", token);
  call = new AgentCall({ token });
  meters = new Meters();
  call.addEventListener("mic", (e) => meters.attach("mic", e.detail.stream));
  call.addEventListener("remote-audio", (e) => {
    ui.audio.srcObject = e.detail.stream;
    ui.audio.play().catch(() => toast("Click anywhere to enable the agent's voice", "warn"));
    meters.attach("agent", e.detail.stream);
  });
  call.addEventListener("session", (e) => {
    view.sessionId = e.detail.sessionId;
    render();
  });
  call.addEventListener("connection", (e) => {
    if (e.detail.state === "connected") {
      view.phase = "live";
      ui.hint.textContent = "Go ahead and speak, or type below. Talk (or type) over the agent to interrupt it.";
    } else if (e.detail.state === "disconnected") {
      toast("Connection unstable…", "warn");
    }
    render();
  });
  call.addEventListener("agent-audio", (e) => {
    // The element too, not just the track: whatever the browser already decoded stops as well.
    ui.audio.muted = e.detail.muted;
    view.agentMuted = e.detail.muted;
    view.agentAudio.push({ ...e.detail, elementMuted: ui.audio.muted });
    if (view.agentAudio.length > 20) view.agentAudio.shift();
  });
  call.addEventListener("agent-event", (e) => onAgentEvent(e.detail));
  call.addEventListener("channel-open", () => {
    view.channelOpen = true;
    render();
  });
  call.addEventListener("channel-closed", () => {
    view.channelOpen = false;
    render();
  });
  call.addEventListener("stats", (e) => (view.stats = e.detail));
  call.addEventListener("error", (e) => showError(e.detail.message));
  call.addEventListener("closed", () => {
    if (view.phase !== "idle") view.phase = "ended";
    view.channelOpen = false;
    meters?.close();
    meters = null;
    render();
  });
  try {
    await call.start();
  } catch (err) {
    const message = err instanceof CallError ? err.message : `Could not start the call: ${err?.message || err}`;
    showError(message);
    if (err?.kind === "token") openSettings(true);
    call.hangUp("error");
    view.phase = "idle";
    render();
  }
}

function hangUp() {
  call?.hangUp();
  call = null;
  view.phase = "ended";
  ui.hint.textContent = "Call ended. Press Start talking to begin a new conversation.";
  render();
}

function openSettings(focus) {
  ui.settings.hidden = false;
  ui.settingsToggle.setAttribute("aria-expanded", "true");
  if (focus) ui.token.focus();
}

ui.connect.addEventListener("click", () => (view.phase === "live" || view.phase === "connecting" ? hangUp() : connect()));
ui.mute.addEventListener("click", () => {
  view.muted = !view.muted;
  call?.setMuted(view.muted);
  render();
});
ui.settingsToggle.addEventListener("click", () => {
  const open = ui.settings.hidden;
  ui.settings.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
});
$("token-show").addEventListener("click", (e) => {
  const hidden = ui.token.type === "password";
  ui.token.type = hidden ? "text" : "password";
  e.currentTarget.textContent = hidden ? "Hide" : "Show";
});
$("banner-close").addEventListener("click", clearError);
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  sendTyped();
});
ui.sayText.addEventListener("keydown", (e) => {
  // Enter sends, Shift+Enter starts a new line; not while an input method is composing a word.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendTyped();
  }
});
ui.sayText.addEventListener("input", () => {
  fitComposer();
  render();
});
document.addEventListener("keydown", (e) => {
  if (e.key === "m" && !e.target.closest("input, textarea") && view.phase === "live") ui.mute.click();
});
document.addEventListener("click", () => ui.audio.srcObject && ui.audio.paused && ui.audio.play().catch(() => {}));
window.addEventListener("pagehide", () => call?.hangUp("page closed"));

// A token may come in the link (?token=…), e.g. from an operator; keep it out of the address bar after.
const params = new URLSearchParams(location.search);
ui.token.value = params.get("token") || sessionStorage.getItem("rejoinder-token") || "";
if (params.has("token")) history.replaceState(null, "", location.pathname);

fetch("api/health")
  .then((r) => r.json())
  .then((h) => {
    if (h.token_required) ui.token.placeholder = "this server requires a token";
    if (h.token_required && !ui.token.value) openSettings(false);
  })
  .catch(() => showError("Cannot reach the Rejoinder server. Is `rejoinder serve` running?"));

render();
