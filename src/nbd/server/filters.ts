/**
 * Filters, after nbdkit's: each wraps the backend below it and changes one thing. They serve operators
 * (read-only, rate) and tests (delay, error injection, request log).
 */
import { setTimeout as sleep } from "node:timers/promises";
import { NbdRequestError } from "../errors.js";
import type { Extent } from "../protocol/codec.js";
import { NbdErrno } from "../protocol/constants.js";
import { PassThrough, type Backend, type Filter, type Support, type ZeroFlags } from "./backend.js";

/** Refuses every write, whatever the backend can do. */
export const readOnly: Filter = (next) =>
  new (class extends PassThrough {
    override canWrite(): boolean {
      return false;
    }
    override canTrim(): boolean {
      return false;
    }
    override canZero(): Support {
      return "none";
    }
    override canFastZero(): boolean {
      return false;
    }
    override canFua(): Support {
      return "none";
    }
  })(next);

/** Waits `ms` before every read and/or write (nbdkit's delay filter). */
export function delay(opts: { readMs?: number; writeMs?: number }): Filter {
  return (next) =>
    new (class extends PassThrough {
      override async pread(buf: Buffer, offset: number): Promise<void> {
        if (opts.readMs) await sleep(opts.readMs);
        return super.pread(buf, offset);
      }
      override async pwrite(buf: Buffer, offset: number, fua: boolean): Promise<void> {
        if (opts.writeMs) await sleep(opts.writeMs);
        return super.pwrite(buf, offset, fua);
      }
    })(next);
}

/** Limits the data read plus written to `bytesPerSec`, shared by every connection (a token bucket). */
export function rateLimit(bytesPerSec: number): Filter {
  let available = bytesPerSec;
  let last = Date.now();
  let queue = Promise.resolve();
  const take = (n: number): Promise<void> => {
    queue = queue.then(async () => {
      for (;;) {
        const now = Date.now();
        available = Math.min(bytesPerSec, available + ((now - last) / 1000) * bytesPerSec);
        last = now;
        if (available >= Math.min(n, bytesPerSec)) {
          available -= n;
          return;
        }
        await sleep(Math.ceil(((Math.min(n, bytesPerSec) - available) / bytesPerSec) * 1000));
      }
    });
    return queue;
  };
  return (next) =>
    new (class extends PassThrough {
      override async pread(buf: Buffer, offset: number): Promise<void> {
        await take(buf.length);
        return super.pread(buf, offset);
      }
      override async pwrite(buf: Buffer, offset: number, fua: boolean): Promise<void> {
        await take(buf.length);
        return super.pwrite(buf, offset, fua);
      }
    })(next);
}

export type Operation = "read" | "write" | "trim" | "zero" | "flush" | "extents" | "cache";

/**
 * Fails chosen operations with an NBD errno: every one (`rate` 1), a fraction of them, or only those that
 * touch [offset, offset+length) — nbdkit's error filter.
 */
export function errorInjection(opts: {
  errno?: number;
  rate?: number;
  ops?: Operation[];
  range?: { offset: number; length: number };
}): Filter {
  const errno = opts.errno ?? NbdErrno.EIO;
  const rate = opts.rate ?? 1;
  const hit = (op: Operation, offset = 0, length = 0): void => {
    if (opts.ops && !opts.ops.includes(op)) return;
    if (
      opts.range &&
      (offset + length <= opts.range.offset || offset >= opts.range.offset + opts.range.length)
    )
      return;
    if (Math.random() < rate) throw new NbdRequestError(errno, `injected error on ${op}`);
  };
  return (next) =>
    new (class extends PassThrough {
      override async pread(buf: Buffer, offset: number): Promise<void> {
        hit("read", offset, buf.length);
        return super.pread(buf, offset);
      }
      override async pwrite(buf: Buffer, offset: number, fua: boolean): Promise<void> {
        hit("write", offset, buf.length);
        return super.pwrite(buf, offset, fua);
      }
      override async trim(offset: number, length: number, fua: boolean): Promise<void> {
        hit("trim", offset, length);
        return super.trim(offset, length, fua);
      }
      override async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
        hit("zero", offset, length);
        return super.zero(offset, length, flags);
      }
      override async flush(): Promise<void> {
        hit("flush");
        return super.flush();
      }
      override async extents(offset: number, length: number, reqOne: boolean): Promise<Extent[]> {
        hit("extents", offset, length);
        return super.extents(offset, length, reqOne);
      }
    })(next);
}

/** Reports every operation, with its duration and outcome, to `log` (nbdkit's log filter). */
export function requestLog(log: (line: string) => void): Filter {
  return (next: Backend) => {
    const timed = async <T>(what: string, fn: () => Promise<T>): Promise<T> => {
      const t0 = process.hrtime.bigint();
      try {
        const r = await fn();
        log(`${what} ok ${Number(process.hrtime.bigint() - t0) / 1e6} ms`);
        return r;
      } catch (err) {
        log(`${what} error ${(err as Error).message}`);
        throw err;
      }
    };
    return new (class extends PassThrough {
      override pread(buf: Buffer, offset: number): Promise<void> {
        return timed(`read offset=${offset} count=${buf.length}`, () => super.pread(buf, offset));
      }
      override pwrite(buf: Buffer, offset: number, fua: boolean): Promise<void> {
        return timed(`write offset=${offset} count=${buf.length} fua=${fua}`, () =>
          super.pwrite(buf, offset, fua),
        );
      }
      override trim(offset: number, length: number, fua: boolean): Promise<void> {
        return timed(`trim offset=${offset} count=${length}`, () => super.trim(offset, length, fua));
      }
      override zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
        return timed(
          `zero offset=${offset} count=${length} may_trim=${flags.mayTrim} fast=${flags.fastZero}`,
          () => super.zero(offset, length, flags),
        );
      }
      override flush(): Promise<void> {
        return timed("flush", () => super.flush());
      }
      override extents(offset: number, length: number, reqOne: boolean): Promise<Extent[]> {
        return timed(`extents offset=${offset} count=${length} req_one=${reqOne}`, () =>
          super.extents(offset, length, reqOne),
        );
      }
    })(next);
  };
}
