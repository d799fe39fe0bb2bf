/**
 * NBD errors with stable codes, and the one place that maps a local errno to the error sent on the wire.
 */
import { NbdmigError } from "../errors.js";
import { ERRNO_NAMES, NbdErrno } from "./protocol/constants.js";

/** The peer broke the protocol: the connection cannot continue. */
export class NbdProtocolError extends NbdmigError {
  constructor(message: string) {
    super("E_NBD_PROTOCOL", message);
  }
}

/** A request failed with an NBD error (EIO, ENOSPC, ...); the connection goes on. */
export class NbdRequestError extends NbdmigError {
  constructor(
    readonly errno: number,
    message?: string,
  ) {
    super(
      `E_NBD_${ERRNO_NAMES[errno] ?? `ERRNO_${errno}`}`,
      message ?? ERRNO_NAMES[errno] ?? `error ${errno}`,
    );
  }
}

/** The handshake ended without an export (refused option, unknown export, TLS required...). */
export class NbdHandshakeError extends NbdmigError {
  constructor(message: string, code = "E_NBD_HANDSHAKE") {
    super(code, message);
  }
}

/** The error to send for a failure in a backend: its own NBD errno, or its Node errno code mapped. */
export function toNbdErrno(err: unknown): number {
  if (err instanceof NbdRequestError) return err.errno;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  switch (code) {
    case "EPERM":
    case "EACCES":
    case "EROFS":
      return NbdErrno.EPERM;
    case "ENOMEM":
      return NbdErrno.ENOMEM;
    case "EINVAL":
      return NbdErrno.EINVAL;
    case "ENOSPC":
    case "EDQUOT":
    case "EFBIG":
      return NbdErrno.ENOSPC;
    case "EOVERFLOW":
      return NbdErrno.EOVERFLOW;
    case "ENOTSUP":
    case "EOPNOTSUPP":
      return NbdErrno.ENOTSUP;
    case "ESHUTDOWN":
      return NbdErrno.ESHUTDOWN;
    default:
      return NbdErrno.EIO;
  }
}
