// The page of /ui: submit a batch as a job, follow it, show each image as it is finished.
// Every request goes to this page's own server (relative URLs); nothing is fetched elsewhere.

const KEY_STORE = "sdxl-api-key";        // sessionStorage: asked once per browser session
const RECENT_STORE = "sdxl-recent-jobs"; // localStorage: this browser's recent jobs
const RECENT_MAX = 20;
const POLL_MS = 1000;

const $ = (id) => document.getElementById(id);
const state = { jobId: null, job: null, polling: null, startedAt: 0, firstDone: 0, variants: {} };

class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(detail);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) {
    const detail = (await response.json().catch(() => ({}))).detail || "This server needs an API key.";
    askForKey(sessionStorage.getItem(KEY_STORE) ? detail : "");
    throw new ApiError(401, detail);
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new ApiError(response.status, body.detail || `The server answered ${response.status}.`, response.headers.get("Retry-After"));
  }
  return response;
}

function explain(error) {
  if (!(error instanceof ApiError)) return `The server cannot be reached (${error.message}). Check the connection and retry.`;
  if ((error.status === 503 || error.status === 429) && error.retryAfter) return `${error.message} (retry in ${error.retryAfter} s)`;
  return error.message;
}

// ----- the key ----------------------------------------------------------------------------------

function askForKey(message) {
  $("key-panel").hidden = false;
  $("key-error").textContent = message;
  $("key").focus();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key").value.trim());
  $("key").value = "";
  if (await start()) $("key-panel").hidden = true;
});

// ----- the batch form ---------------------------------------------------------------------------

function promptLines(text) {
  // A spreadsheet column pastes as lines; a cell holding quotes or a line break comes "quoted".
  return text.split(/\r?\n/).map((line) => line.trim()).filter((line) => line.length > 0)
    .map((line) => (/^".*"$/.test(line) ? line.slice(1, -1).replace(/""/g, '"') : line));
}

function clearErrors() {
  for (const id of ["prompts-error", "fields-error", "submit-error"]) $(id).textContent = "";
}

function showSubmitError(error) {
  const text = explain(error);
  const field = /^Invalid request: (prompts|num_images_per_prompt|seed|format|quality|size)/.exec(text)
    || /^(prompts|size|quality)\b/.exec(text);
  if (field && field[1] === "prompts") $("prompts-error").textContent = text;
  else if (field) $("fields-error").textContent = text;
  else $("submit-error").textContent = text;
}

function formBody() {
  const body = {
    prompts: promptLines($("prompts").value),
    num_images_per_prompt: Number($("per-prompt").value || 1),
    format: $("format").value,
    size: $("size").value,
    return_format: "url",
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("quality").value !== "" && body.format !== "png") body.quality = Number($("quality").value);
  return body;
}

$("format").addEventListener("change", () => {
  $("quality").disabled = $("format").value === "png";
});

$("batch-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const button = $("generate");
  button.disabled = true;
  try {
    const body = formBody();
    const response = await api("/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify(body),
    });
    const job = await response.json();
    remember(job.job_id, body.prompts[0], job.images_total);
    history.pushState(null, "", `/ui?job=${job.job_id}`);
    follow(job.job_id);
  } catch (error) {
    showSubmitError(error);
  } finally {
    button.disabled = false;
  }
});

// ----- following a job --------------------------------------------------------------------------

function follow(jobId) {
  if (state.polling) clearTimeout(state.polling);
  Object.assign(state, { jobId, job: null, startedAt: performance.now(), firstDone: null, variants: loadVariants(jobId) });
  $("job-panel").hidden = false;
  $("job-id").textContent = jobId;
  $("job-error").textContent = "";
  $("images").replaceChildren();
  $("progress").value = 0;
  $("progress-text").textContent = "Waiting for the server…";
  poll();
}

async function poll() {
  const jobId = state.jobId;
  try {
    const job = await (await api(`/jobs/${jobId}`)).json();
    if (jobId !== state.jobId) return;
    state.job = job;
    render(job);
    if (job.state === "queued" || job.state === "running") state.polling = setTimeout(poll, POLL_MS);
  } catch (error) {
    if (jobId !== state.jobId) return;
    $("job-error").textContent = explain(error);
    if (!(error instanceof ApiError) || error.status >= 500) state.polling = setTimeout(poll, POLL_MS * 3);
  }
}

function finishedOf(job) {
  if (job.state === "done") return job.images.map((url, index) => ({ index, seed: job.seeds[index], url }));
  return job.finished_images || [];
}

function render(job) {
  const list = $("images");
  if (list.children.length !== job.images_total) {
    list.replaceChildren(...Array.from({ length: job.images_total }, (_, index) => slot(job, index)));
  }
  for (const image of finishedOf(job)) fill(job, image.index, image.url, image.seed);
  for (const [index, jobs] of Object.entries(state.variants)) for (const variantJob of jobs) followVariant(Number(index), variantJob);
  const done = job.images_done;
  $("progress").max = job.images_total;
  $("progress").value = done;
  $("progress-text").textContent = progressText(job);
  $("cancel").hidden = !(job.state === "queued" || job.state === "running");
  if (job.state === "failed" || job.state === "cancelled") $("job-error").textContent = job.detail || `The job ended ${job.state}.`;
}

function progressText(job) {
  const done = job.images_done;
  const head = `${done} of ${job.images_total} image(s)`;
  if (job.state === "done") return `${head}: done`;
  if (job.state !== "running" && job.state !== "queued") return `${head}: ${job.state}`;
  if (done === 0) return `${head}: queued`;
  const now = performance.now();
  if (state.firstDone === null) state.firstDone = { at: now, done };
  const elapsed = (now - state.firstDone.at) / 1000;
  const made = done - state.firstDone.done;
  if (made <= 0 || elapsed <= 0) return `${head}: running`;
  const left = Math.ceil(((job.images_total - done) * elapsed) / made);
  return `${head}: about ${left} s left`;
}

function promptOf(job, index) {
  return job.prompts[Math.floor(index / job.num_images_per_prompt)];
}

function slot(job, index) {
  const item = document.createElement("li");
  item.dataset.index = String(index);
  const variants = document.createElement("div");
  variants.className = "variants";
  const pending = document.createElement("div");
  pending.className = "pending";
  pending.textContent = `#${index + 1}: waiting`;
  variants.append(pending);
  const caption = document.createElement("p");
  caption.className = "caption";
  caption.textContent = `#${index + 1} · ${promptOf(job, index)}`;
  const tools = document.createElement("div");
  tools.className = "tools";
  const reroll = document.createElement("button");
  reroll.type = "button";
  reroll.className = "secondary reroll";
  reroll.textContent = "New seed";
  reroll.setAttribute("aria-label", `Make image ${index + 1} again with a new seed`);
  reroll.addEventListener("click", () => rerollImage(index, reroll));
  tools.append(reroll);
  item.append(variants, caption, tools);
  return item;
}

function fill(job, index, url, seed, variantOf = null) {
  const item = $("images").querySelector(`li[data-index="${index}"]`);
  if (!item || item.querySelector(`img[src="${CSS.escape(url)}"]`)) return;
  const variants = item.querySelector(".variants");
  item.querySelector(".pending")?.remove();
  const prompt = promptOf(job, index);
  const figure = document.createElement("div");
  figure.className = "variant";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "thumb";
  button.setAttribute("aria-label", `Show image ${index + 1} (seed ${seed}) at full size`);
  const img = document.createElement("img");
  img.src = url;
  img.alt = prompt;
  img.loading = "lazy";
  button.append(img);
  button.addEventListener("click", () => view(url, `${prompt} · seed ${seed}`));
  const seedLine = document.createElement("p");
  seedLine.className = "caption seed";
  seedLine.textContent = variantOf ? `new seed ${seed}` : `seed ${seed}`;
  const save = document.createElement("a");
  save.href = url;
  save.download = url.split("/").pop();
  save.textContent = "Download";
  const tools = document.createElement("div");
  tools.className = "tools";
  tools.append(save);
  figure.append(button, seedLine, tools);
  variants.append(figure);
}

function view(url, caption) {
  $("viewer-image").src = url;
  $("viewer-image").alt = caption;
  $("viewer-caption").textContent = caption;
  $("viewer").showModal();
}

// ----- a new seed for one image -----------------------------------------------------------------

function variantsKey(jobId) {
  return `sdxl-variants-${jobId}`;
}

function loadVariants(jobId) {
  try {
    return JSON.parse(localStorage.getItem(variantsKey(jobId))) || {};
  } catch {
    return {};
  }
}

const followed = new Set();

async function rerollImage(index, button) {
  const job = state.job;
  if (!job) return;
  button.disabled = true;
  $("job-error").textContent = "";
  try {
    const body = {
      prompts: [promptOf(job, index)],
      seed: crypto.getRandomValues(new Uint32Array(1))[0],
      format: job.format,
      size: job.size,
      return_format: "url",
    };
    if (job.quality !== null && job.quality !== undefined) body.quality = job.quality;
    const response = await api("/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify(body),
    });
    const variant = await response.json();
    (state.variants[index] ||= []).push(variant.job_id);
    localStorage.setItem(variantsKey(state.jobId), JSON.stringify(state.variants));
    followVariant(index, variant.job_id);
  } catch (error) {
    $("job-error").textContent = explain(error);
  } finally {
    button.disabled = false;
  }
}

async function followVariant(index, variantJob) {
  if (followed.has(`${state.jobId}/${variantJob}`)) return;
  followed.add(`${state.jobId}/${variantJob}`);
  const owner = state.jobId;
  for (;;) {
    let job;
    try {
      job = await (await api(`/jobs/${variantJob}`)).json();
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) return; // expired
      $("job-error").textContent = explain(error);
      await new Promise((resolve) => setTimeout(resolve, POLL_MS * 3));
      continue;
    }
    if (owner !== state.jobId) return;
    if (job.state === "done") {
      fill(state.job, index, job.images[0], job.seeds[0], variantJob);
      return;
    }
    if (job.state !== "queued" && job.state !== "running") {
      $("job-error").textContent = `The new image for #${index + 1} failed: ${job.detail || job.state}`;
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// ----- the whole batch --------------------------------------------------------------------------

$("download").addEventListener("click", async () => {
  const button = $("download");
  button.disabled = true;
  $("job-error").textContent = "";
  try {
    const response = await api(`/jobs/${state.jobId}/archive`);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = `job-${state.jobId}.zip`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (error) {
    $("job-error").textContent = explain(error);
  } finally {
    button.disabled = false;
  }
});

$("cancel").addEventListener("click", async () => {
  try {
    await api(`/jobs/${state.jobId}`, { method: "DELETE" });
    poll();
  } catch (error) {
    $("job-error").textContent = explain(error);
  }
});

// ----- recent jobs ------------------------------------------------------------------------------

function recentJobs() {
  try {
    return JSON.parse(localStorage.getItem(RECENT_STORE)) || [];
  } catch {
    return [];
  }
}

function remember(jobId, firstPrompt, total) {
  const jobs = [{ id: jobId, prompt: firstPrompt, total, at: Date.now() }, ...recentJobs().filter((j) => j.id !== jobId)];
  localStorage.setItem(RECENT_STORE, JSON.stringify(jobs.slice(0, RECENT_MAX)));
  showRecent();
}

function showRecent() {
  const items = recentJobs().map((job) => {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/ui?job=${encodeURIComponent(job.id)}`;
    link.textContent = `${new Date(job.at).toLocaleString()} · ${job.total} image(s) · ${job.prompt}`;
    item.append(link);
    return item;
  });
  $("recent").replaceChildren(...items);
  $("recent-panel").hidden = items.length === 0;
}

// ----- start ------------------------------------------------------------------------------------

async function start() {
  let info;
  try {
    info = await (await api("/")).json();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) $("submit-error").textContent = explain(error);
    return false;
  }
  const size = $("size");
  if (size.options.length === 0) {
    for (const value of info.sizes) size.append(new Option(value, value));
  }
  const jobId = new URLSearchParams(location.search).get("job");
  if (jobId) follow(jobId);
  return true;
}

window.addEventListener("popstate", () => {
  const jobId = new URLSearchParams(location.search).get("job");
  if (jobId) follow(jobId);
});

showRecent();
start();
