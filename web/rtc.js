// The call: microphone, peer connection, `events` data channel, signalling, stats.
// UI-free: it reports through DOM events on itself, so the page (or a test) decides what to show.

/** A problem the person can act on; `kind` picks the wording and which control to highlight. */
export class CallError extends Error {
  constructor(kind, message, detail = "") {
    super(message);
    this.kind = kind;
    this.detail = detail;
  }
}

/**
 * Should the agent's voice be heard right now? The session pauses its audio the moment it hears
 * you start talking over it (`state` -> `user_speaking`, reason "barge-in") and drops the answer if
 * it was a real interruption (`barge_in`, outcome "interruption"); audio already on its way (the
 * server's queue, the network, this browser's jitter buffer) would still play for a while, so the
 * page stops playing it at once. It plays again for what comes next: a false interruption (outcome
 * "noise", "backchannel" or "echo": the answer resumes), a new answer (`agent_speech` started), or
 * any state after the interruption (thinking, speaking, listening).
 * Returns the new muted value when `ev` changes it, otherwise null.
 */
export function agentAudioGate(ev, muted, typedCut = false) {
  // `typedCut`: silenced because a typed message cut the agent off (AgentCall.sendText). The turn
  // is already over, so it plays again only for what is said next: its answer, or nothing to say.
  let want = null;
  if (ev.type === "state") {
    if (ev.new !== "user_speaking") want = typedCut && ev.new === "thinking" ? null : false;
    else if (ev.reason === "barge-in") want = true;
  } else if (ev.type === "barge_in") {
    want = typedCut ? null : ev.outcome === "interruption";
  } else if (ev.type === "agent_speech" && ev.started) {
    want = false;
  }
  return want === null || want === muted ? null : want;
}

const MIC_CONSTRAINTS = {
  audio: {
    // The agent talks while it listens: without echo cancellation it would hear itself.
    echoCancellation: true,
    noiseSuppression: true,
    autoGainControl: true,
    channelCount: 1,
  },
  video: false,
};

export class AgentCall extends EventTarget {
  constructor({ baseUrl = ".", token = "" } = {}) {
    super();
    // Relative to the page, so the app also works behind a reverse proxy under a path prefix.
    this.base = new URL(baseUrl, location.href);
    this.token = token;
    this.pc = null;
    this.channel = null;
    this.mic = null;
    this.remoteStream = null;
    this.resource = null;
    this.sessionId = null;
    this.muted = false;
    this.agentMuted = false; // the agent's voice is silenced on this side (barge-in), see agentAudioGate
    this.agentState = null; // the session's last `state` event
    this.typedCut = null; // the control id of the typed message that silenced the agent, see sendText
    this.closed = false;
    this.stats = { inboundAudioBytes: 0, inboundPackets: 0, inboundAudioEnergy: 0, outboundAudioBytes: 0, jitterBufferMs: null, rttMs: null };
    this._statsTimer = null;
    this._seq = 0;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  async start() {
    if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
      throw new CallError("insecure", "The microphone is only available on https:// pages or on http://localhost. Open the page that way.");
    }
    try {
      this.mic = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
    } catch (err) {
      throw micError(err);
    }
    if (this.closed) return this._stopMic();
    this._emit("mic", { stream: this.mic });

    const pc = (this.pc = new RTCPeerConnection({ iceServers: [] }));
    for (const track of this.mic.getAudioTracks()) pc.addTrack(track, this.mic);
    this.channel = pc.createDataChannel("events", { ordered: true });
    this.channel.onmessage = (m) => this._onMessage(m.data);
    this.channel.onopen = () => this._emit("channel-open", {});
    this.channel.onclose = () => this._emit("channel-closed", {});
    pc.ontrack = (ev) => {
      this.remoteStream = ev.streams[0] || new MediaStream([ev.track]);
      this._emit("remote-audio", { stream: this.remoteStream });
    };
    pc.onconnectionstatechange = () => {
      const s = pc.connectionState;
      this._emit("connection", { state: s });
      if (s === "failed") this._fail(new CallError("network", "The connection to the agent was lost. Check the network and start again."));
    };

    await pc.setLocalDescription(await pc.createOffer());
    await waitIceGathering(pc, 2000);
    const answer = await this._signal(pc.localDescription);
    if (this.closed) return;
    await pc.setRemoteDescription(answer);
    this._statsTimer = setInterval(() => this._pollStats(), 500);
  }

  async _signal(offer) {
    const headers = { "Content-Type": "application/json" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    let res;
    try {
      res = await fetch(this._url("api/offer"), {
        method: "POST",
        headers,
        body: JSON.stringify({ sdp: offer.sdp, type: offer.type }),
      });
    } catch (err) {
      throw new CallError("unreachable", "Cannot reach the Rejoinder server. Is `rejoinder serve` running?", String(err));
    }
    let body = null;
    try {
      body = await res.json();
    } catch {
      body = null;
    }
    if (!res.ok) {
      const why = body?.error || `HTTP ${res.status}`;
      if (res.status === 401) throw new CallError("token", "This server needs an access token. Enter it in Settings (⚙) and try again.", why);
      if (res.status === 503) throw new CallError("busy", "The agent is busy with other conversations right now. Try again in a minute.", why);
      if (res.status === 403) throw new CallError("origin", "This page is not allowed to use the server (origin not allowed).", why);
      throw new CallError("server", `The server refused the call: ${why}`, why);
    }
    this.sessionId = body.session_id;
    this.resource = body.resource;
    this._emit("session", { sessionId: this.sessionId });
    return { type: body.type, sdp: body.sdp };
  }

  _url(path) {
    return new URL(path.replace(/^\//, ""), this.base);
  }

  _onMessage(data) {
    let ev;
    try {
      ev = JSON.parse(data);
    } catch {
      return;
    }
    if (!ev || typeof ev.type !== "string") return;
    // Before anything else: every millisecond here is agent speech the person still hears.
    let muted = agentAudioGate(ev, this.agentMuted, this.typedCut !== null);
    if (ev.type === "control_result" && ev.id === this.typedCut && !ev.ok) muted = false; // nothing was cut off
    if (muted !== null) this._setAgentMuted(muted, `${ev.type}:${ev.outcome || ev.new || ""}`);
    if (ev.type === "state") this.agentState = ev.new;
    this._emit("agent-event", ev);
  }

  _setAgentMuted(muted, reason) {
    if (muted === this.agentMuted) return;
    this.agentMuted = muted;
    if (!muted) this.typedCut = null;
    for (const t of this.remoteStream?.getAudioTracks() || []) t.enabled = !muted;
    this._emit("agent-audio", { muted, reason, at: performance.now() });
  }

  /**
   * Ask the session something over the data channel (say, interrupt, end, status…). Returns the
   * message's id (its `control_result` carries it), or 0 when the channel is not open.
   */
  control(command, args = {}) {
    if (this.channel?.readyState !== "open") return 0;
    const id = ++this._seq;
    this.channel.send(JSON.stringify({ type: "control", id, command, args }));
    return id;
  }

  /**
   * A typed message: a user turn like a spoken one (`user_text`). Typed while the agent speaks, it
   * cuts the agent off on the server as talking over it would, so its voice is silenced here at
   * once too, as for a barge-in, until what comes next. Returns the control id, or 0 (not sent).
   */
  sendText(text) {
    const id = this.control("user_text", { text });
    if (id && this.agentState === "speaking" && !this.agentMuted) {
      this.typedCut = id;
      this._setAgentMuted(true, "typed");
    }
    return id;
  }

  setMuted(muted) {
    this.muted = muted;
    // A disabled track keeps the connection alive and sends silence: the server does not hang up.
    for (const t of this.mic?.getAudioTracks() || []) t.enabled = !muted;
  }

  async _pollStats() {
    if (!this.pc) return;
    let report;
    try {
      report = await this.pc.getStats();
    } catch {
      return;
    }
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") {
        this.stats.inboundAudioBytes = s.bytesReceived || 0;
        this.stats.inboundPackets = s.packetsReceived || 0;
        this.stats.inboundAudioEnergy = s.totalAudioEnergy || 0;
        this.stats.agentLevel = s.audioLevel || 0;
        if (s.jitterBufferEmittedCount) this.stats.jitterBufferMs = (1000 * s.jitterBufferDelay) / s.jitterBufferEmittedCount;
      } else if (s.type === "outbound-rtp" && s.kind === "audio") {
        this.stats.outboundAudioBytes = s.bytesSent || 0;
      } else if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
        this.stats.rttMs = 1000 * s.currentRoundTripTime;
      }
    });
    this._emit("stats", { ...this.stats });
  }

  _fail(err) {
    this._emit("error", err);
    this.hangUp("error");
  }

  _stopMic() {
    for (const t of this.mic?.getTracks() || []) t.stop();
  }

  /** Hang up: tell the server (so the slot frees at once), then close everything locally. */
  hangUp(reason = "hang-up") {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this._statsTimer);
    if (this.resource) {
      const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
      fetch(this._url(this.resource), { method: "DELETE", headers, keepalive: true }).catch(() => {});
    }
    try {
      this.channel?.close();
      this.pc?.close();
    } catch {
      /* already closed */
    }
    this._stopMic();
    this._emit("closed", { reason });
  }
}

function micError(err) {
  const name = err?.name || "";
  if (name === "NotAllowedError" || name === "SecurityError") {
    return new CallError("mic-denied", "Microphone access was refused. Allow it for this site (the icon in the address bar) and try again.", name);
  }
  if (name === "NotFoundError" || name === "OverconstrainedError") {
    return new CallError("mic-missing", "No microphone was found. Plug one in and try again.", name);
  }
  if (name === "NotReadableError" || name === "AbortError") {
    return new CallError("mic-busy", "The microphone could not be opened: another application may be using it.", name);
  }
  return new CallError("mic", `The microphone could not be opened (${name || err}).`, String(err));
}

function waitIceGathering(pc, timeoutMs) {
  // Non-trickle signalling: the offer must carry the candidates. Host candidates take milliseconds;
  // the timeout only guards against a platform that never reports "complete".
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", check);
      clearTimeout(timer);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}
