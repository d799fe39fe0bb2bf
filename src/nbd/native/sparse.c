/*
 * The few Linux calls a sparse file backend needs and Node does not offer: lseek(SEEK_DATA/SEEK_HOLE) for
 * block status, fallocate(PUNCH_HOLE/ZERO_RANGE) for trim and zero. Built at install time with the
 * compiler and Node's headers (scripts/build-native.sh); src/nbd/native/sparse.ts falls back when it is
 * missing. Errors are thrown as Node-style errors with `code` (e.g. "EOPNOTSUPP") and `errno`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <node_api.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static napi_value throw_errno(napi_env env, int e, const char *syscall) {
  const char *name = strerrorname_np(e);
  napi_value code, msg, err, num;
  char text[256];
  snprintf(text, sizeof text, "%s: %s", syscall, strerror(e));
  napi_create_string_utf8(env, name ? name : "EIO", NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
  napi_create_error(env, code, msg, &err);
  napi_create_int32(env, -e, &num);
  napi_set_named_property(env, err, "errno", num);
  napi_throw(env, err);
  return NULL;
}

static int args(napi_env env, napi_callback_info info, size_t n, int64_t *out) {
  napi_value argv[3];
  size_t argc = 3;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < n) {
    napi_throw_type_error(env, NULL, "not enough arguments");
    return -1;
  }
  for (size_t i = 0; i < n; i++) {
    if (napi_get_value_int64(env, argv[i], &out[i]) != napi_ok) {
      napi_throw_type_error(env, NULL, "arguments must be numbers");
      return -1;
    }
  }
  return 0;
}

/* seek(fd, offset, hole): the next data (hole=0) or hole (hole=1) at or after offset; -1 when none. */
static napi_value Seek(napi_env env, napi_callback_info info) {
  int64_t a[3];
  if (args(env, info, 3, a)) return NULL;
  off_t r = lseek((int)a[0], (off_t)a[1], a[2] ? SEEK_HOLE : SEEK_DATA);
  if (r < 0 && errno != ENXIO) return throw_errno(env, errno, "lseek");
  napi_value v;
  napi_create_int64(env, r < 0 ? -1 : (int64_t)r, &v);
  return v;
}

static napi_value falloc(napi_env env, napi_callback_info info, int mode, const char *what) {
  int64_t a[3];
  if (args(env, info, 3, a)) return NULL;
  if (fallocate((int)a[0], mode, (off_t)a[1], (off_t)a[2]) < 0) return throw_errno(env, errno, what);
  return NULL;
}

static napi_value PunchHole(napi_env env, napi_callback_info info) {
  return falloc(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "fallocate(PUNCH_HOLE)");
}

static napi_value ZeroRange(napi_env env, napi_callback_info info) {
  return falloc(env, info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "fallocate(ZERO_RANGE)");
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seek", NULL, Seek, NULL, NULL, NULL, napi_default, NULL},
      {"punchHole", NULL, PunchHole, NULL, NULL, NULL, napi_default, NULL},
      {"zeroRange", NULL, ZeroRange, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 3, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
