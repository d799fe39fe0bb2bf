/*
 * The one socket option the NBD client needs and Node does not offer: TCP_QUICKACK, so that the handshake's
 * replies are acknowledged at once. Built at install time beside the sparse helper
 * (scripts/build-native.sh); src/nbd/native/tcp.ts does without it when it is missing.
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <node_api.h>
#include <sys/socket.h>

/* quickAck(fd): acknowledge what arrives on this TCP socket at once, until the kernel next decides to
 * delay. Returns false when the descriptor is not a TCP socket (a Unix socket, say). */
static napi_value QuickAck(napi_env env, napi_callback_info info) {
  napi_value argv[1], out;
  size_t argc = 1;
  int32_t fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "quickAck(fd): fd must be a number");
    return NULL;
  }
  int one = 1;
  int ok = setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one) == 0;
  napi_get_boolean(env, ok, &out);
  return out;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"quickAck", NULL, QuickAck, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 1, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
