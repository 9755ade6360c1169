// Shared memory between the thread that owns a job and the engine thread that runs it, read by the
// engine thread at step boundaries, where a message would wait for its event loop: a cancellation flag
// and an optional hold. A hold stops the job after a given step until the owner releases it; tests use
// it to hand control from one thread to another deterministically instead of racing them.
const CANCELLED = 0;
const HOLD_AT = 1;
const HELD = 2;

export class JobControl {
  private readonly cells: Int32Array;

  constructor(readonly buffer: SharedArrayBuffer = new SharedArrayBuffer(3 * Int32Array.BYTES_PER_ELEMENT)) {
    this.cells = new Int32Array(buffer);
  }

  // owner's side

  cancel(): void {
    Atomics.store(this.cells, CANCELLED, 1);
    this.release(); // a held job must see its cancellation
  }

  // engine thread's side

  get cancelled(): boolean {
    return Atomics.load(this.cells, CANCELLED) !== 0;
  }

  /**
   * Called with each step before its progress event is sent: true when a hold is armed for this step,
   * which then counts as held from now on (set before the event, so a release that answers the event
   * cannot come first and be lost).
   */
  arriveAt(step: number): boolean {
    if (Atomics.load(this.cells, HOLD_AT) !== step || this.cancelled) return false;
    Atomics.store(this.cells, HELD, 1);
    return true;
  }

  /** Blocks the engine thread until the hold is released (or the job cancelled). */
  waitWhileHeld(): void {
    while (Atomics.load(this.cells, HELD) === 1) Atomics.wait(this.cells, HELD, 1);
  }

  /** Arms a hold after `step` (1-based, as in progress events); every run of the job stops there. */
  holdAfter(step: number): void {
    Atomics.store(this.cells, HOLD_AT, step);
  }

  release(): void {
    Atomics.store(this.cells, HELD, 0);
    Atomics.notify(this.cells, HELD);
  }
}

/**
 * Stops a job on its engine thread right after it reported `step`, every time it gets there (a
 * restarted job stops again), until `release()`; the progress event of that step has been sent by
 * then. Pass it as `hold` to an engine-thread client's generate().
 */
export class StepHold {
  readonly control = new JobControl();

  constructor(readonly step: number) {
    this.control.holdAfter(step);
  }

  release(): void {
    this.control.release();
  }
}
