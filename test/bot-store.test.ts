import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { JobStore, type NewJob } from '../src/store/job-store.ts';

function newJob(id: string, userId: string, createdAt: number): NewJob {
  return {
    id,
    kind: 'imagine',
    userId,
    guildId: 'g1',
    channelId: 'c1',
    request: { prompt: `a red circle ${id}`, mode: 'afa', ensemble: 'duo', seed: 1234 + createdAt, steps: 8 },
    reply: { type: 'interaction', applicationId: 'app', interactionId: `i-${id}`, token: `tok-${id}`, tokenIssuedAt: createdAt },
    parentJobId: null,
    replyToMessageId: null,
    createdAt,
  };
}

test('jobs survive closing and reopening the database, with their state', () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'bot-store-'));
  try {
    const file = path.join(dir, 'nested', 'jobs.sqlite');
    const store = new JobStore(file);
    store.create(newJob('a', 'alice', 1));
    store.create(newJob('b', 'bob', 2));
    store.create(newJob('c', 'alice', 3));
    assert.equal(store.markRunning('a', 10), true);
    store.setStatusMessage('a', 'm-a');
    store.finish('c', 'cancelled', { at: 11 });
    assert.equal(store.markRunning('c'), false, 'a cancelled job cannot start');
    store.markRunning('b', 12);
    store.finish('b', 'done', {
      at: 20,
      result: {
        params: {
          prompt: 'p', negative: '', mode: 'afa', ensemble: 'duo', experts: ['x', 'y'], seed: 5, steps: 8, guidance: 5,
          scheduler: 'ddim', karras: false, width: 64, height: 64, count: 1, model: 'tiny@1', truncatedWords: [],
        },
        seeds: [5],
        timings: { totalMs: 8, denoiseMs: 6, decodeMs: 1, runMs: 7, denoiseRunMs: 5 },
        warnings: [],
      },
    });
    store.setResultMessage('b', 'm-b');
    store.close();

    const reopened = new JobStore(file);
    const unfinished = reopened.unfinished();
    assert.deepEqual(unfinished.map((j) => [j.id, j.status, j.attempts]), [['a', 'running', 1]]);
    assert.equal(unfinished[0].statusMessageId, 'm-a');
    assert.deepEqual(unfinished[0].reply, {
      type: 'interaction', applicationId: 'app', interactionId: 'i-a', token: 'tok-a', tokenIssuedAt: 1,
    });
    const b = reopened.findByMessage('m-b');
    assert.equal(b?.id, 'b');
    assert.equal(b?.status, 'done');
    assert.equal(b?.result?.params.model, 'tiny@1');
    assert.equal(b?.request.prompt, 'a red circle b');
    assert.equal(b?.startedAt, 12);
    assert.equal(b?.finishedAt, 20);
    assert.equal(reopened.findByMessage('m-a')?.id, 'a', 'status messages are found too');
    assert.equal(reopened.findByMessage('nope'), undefined);
    assert.deepEqual(reopened.activeOfUser('alice').map((j) => j.id), ['a']);
    assert.deepEqual(reopened.recentOfUser('alice').map((j) => j.id), ['c', 'a']);
    reopened.requeue('a');
    assert.equal(reopened.get('a')?.status, 'queued');
    reopened.setReply('a', { type: 'channel' });
    reopened.markDeleted('b');
    assert.deepEqual(reopened.get('a')?.reply, { type: 'channel' });
    assert.equal(reopened.get('b')?.deleted, true);
    reopened.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
