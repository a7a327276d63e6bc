/* server/nbd-protocol.h: the NBD wire format, as qnbd speaks it.
 *
 * Constants and packed structs from the NBD protocol document
 * (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).
 * Every multi-byte field on the wire is big-endian: the structs below hold
 * wire-order values, so fill them with htobe*() and read them with be*toh().
 * Only the fixed newstyle handshake is described; oldstyle is not served.
 */
#ifndef QNBD_NBD_PROTOCOL_H
#define QNBD_NBD_PROTOCOL_H

#include <stdint.h>

#define NBD_PACKED __attribute__ ((__packed__))

/* ------------------------------------------------------------------ */
/* Magics.                                                             */
/* ------------------------------------------------------------------ */

#define NBD_MAGIC                   UINT64_C (0x4e42444d41474943) /* "NBDMAGIC" */
#define NBD_IHAVEOPT                UINT64_C (0x49484156454f5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC               UINT64_C (0x0003e889045565a9) /* option replies */
#define NBD_REQUEST_MAGIC           UINT32_C (0x25609513)
#define NBD_SIMPLE_REPLY_MAGIC      UINT32_C (0x67446698)
#define NBD_STRUCTURED_REPLY_MAGIC  UINT32_C (0x668e33ef)

/* ------------------------------------------------------------------ */
/* Handshake.                                                          */
/* ------------------------------------------------------------------ */

/* Handshake flags (16 bits, server to client). */
#define NBD_FLAG_FIXED_NEWSTYLE     (1u << 0)
#define NBD_FLAG_NO_ZEROES          (1u << 1)

/* Client flags (32 bits, client to server). */
#define NBD_FLAG_C_FIXED_NEWSTYLE   (1u << 0)
#define NBD_FLAG_C_NO_ZEROES        (1u << 1)

/* Options. */
#define NBD_OPT_EXPORT_NAME         1
#define NBD_OPT_ABORT               2
#define NBD_OPT_LIST                3
#define NBD_OPT_PEEK_EXPORT         4  /* withdrawn */
#define NBD_OPT_STARTTLS            5
#define NBD_OPT_INFO                6
#define NBD_OPT_GO                  7
#define NBD_OPT_STRUCTURED_REPLY    8
#define NBD_OPT_LIST_META_CONTEXT   9
#define NBD_OPT_SET_META_CONTEXT    10
#define NBD_OPT_EXTENDED_HEADERS    11

/* Option reply types; errors have bit 31 set. */
#define NBD_REP_ACK                 1
#define NBD_REP_SERVER              2
#define NBD_REP_INFO                3
#define NBD_REP_META_CONTEXT        4
#define NBD_REP_ERR(n)              ((UINT32_C (1) << 31) | (n))
#define NBD_REP_ERR_UNSUP           NBD_REP_ERR (1)
#define NBD_REP_ERR_POLICY          NBD_REP_ERR (2)
#define NBD_REP_ERR_INVALID         NBD_REP_ERR (3)
#define NBD_REP_ERR_PLATFORM        NBD_REP_ERR (4)
#define NBD_REP_ERR_TLS_REQD        NBD_REP_ERR (5)
#define NBD_REP_ERR_UNKNOWN         NBD_REP_ERR (6)
#define NBD_REP_ERR_SHUTDOWN        NBD_REP_ERR (7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD NBD_REP_ERR (8)
#define NBD_REP_ERR_TOO_BIG         NBD_REP_ERR (9)

/* Information types of NBD_REP_INFO (NBD_OPT_INFO and NBD_OPT_GO). */
#define NBD_INFO_EXPORT             0
#define NBD_INFO_NAME               1
#define NBD_INFO_DESCRIPTION        2
#define NBD_INFO_BLOCK_SIZE         3

/* Longest string (export name, description, message) the protocol allows. */
#define NBD_MAX_STRING              4096

/* Server greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
struct nbd_greeting {
  uint64_t magic;               /* NBD_MAGIC */
  uint64_t ihaveopt;            /* NBD_IHAVEOPT */
  uint16_t flags;               /* NBD_FLAG_FIXED_NEWSTYLE ... */
} NBD_PACKED;

/* Option header sent by the client; option data follows. */
struct nbd_option {
  uint64_t magic;               /* NBD_IHAVEOPT */
  uint32_t option;              /* NBD_OPT_* */
  uint32_t length;              /* bytes of option data that follow */
} NBD_PACKED;

/* Option reply header sent by the server; reply data follows. */
struct nbd_option_reply {
  uint64_t magic;               /* NBD_REP_MAGIC */
  uint32_t option;              /* the option this answers */
  uint32_t reply;               /* NBD_REP_* */
  uint32_t length;              /* bytes of reply data that follow */
} NBD_PACKED;

/* Answer to NBD_OPT_EXPORT_NAME (zeroes omitted with NO_ZEROES). */
struct nbd_export_name_reply {
  uint64_t size;                /* export size in bytes */
  uint16_t eflags;              /* transmission flags */
  uint8_t zeroes[124];          /* reserved */
} NBD_PACKED;

/* NBD_REP_INFO payload for NBD_INFO_EXPORT. */
struct nbd_info_export {
  uint16_t info;                /* NBD_INFO_EXPORT */
  uint64_t size;                /* export size in bytes */
  uint16_t eflags;              /* transmission flags */
} NBD_PACKED;

/* NBD_REP_INFO payload for NBD_INFO_BLOCK_SIZE. */
struct nbd_info_block_size {
  uint16_t info;                /* NBD_INFO_BLOCK_SIZE */
  uint32_t minimum;             /* smallest offset/length alignment */
  uint32_t preferred;           /* efficient I/O size */
  uint32_t maximum;             /* largest payload */
} NBD_PACKED;

/* ------------------------------------------------------------------ */
/* Transmission.                                                       */
/* ------------------------------------------------------------------ */

/* Transmission flags (16 bits, server to client). */
#define NBD_FLAG_HAS_FLAGS          (1u << 0)
#define NBD_FLAG_READ_ONLY          (1u << 1)
#define NBD_FLAG_SEND_FLUSH         (1u << 2)
#define NBD_FLAG_SEND_FUA           (1u << 3)
#define NBD_FLAG_ROTATIONAL         (1u << 4)
#define NBD_FLAG_SEND_TRIM          (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES  (1u << 6)
#define NBD_FLAG_SEND_DF            (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN     (1u << 8)
#define NBD_FLAG_SEND_RESIZE        (1u << 9)
#define NBD_FLAG_SEND_CACHE         (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO     (1u << 11)

/* Commands. */
#define NBD_CMD_READ                0
#define NBD_CMD_WRITE               1
#define NBD_CMD_DISC                2
#define NBD_CMD_FLUSH               3
#define NBD_CMD_TRIM                4
#define NBD_CMD_CACHE               5
#define NBD_CMD_WRITE_ZEROES        6
#define NBD_CMD_BLOCK_STATUS        7

/* Command flags. */
#define NBD_CMD_FLAG_FUA            (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE        (1u << 1)
#define NBD_CMD_FLAG_DF             (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE        (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO      (1u << 4)

/* Structured reply flags and chunk types; error types have bit 15 set. */
#define NBD_REPLY_FLAG_DONE         (1u << 0)
#define NBD_REPLY_TYPE_NONE         0
#define NBD_REPLY_TYPE_OFFSET_DATA  1
#define NBD_REPLY_TYPE_OFFSET_HOLE  2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR        ((1u << 15) | 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET ((1u << 15) | 2)

/* Flags of the base:allocation metadata context. */
#define NBD_STATE_HOLE              (1u << 0)
#define NBD_STATE_ZERO              (1u << 1)

/* Error values of replies.  Not errno values, though they look alike. */
#define NBD_SUCCESS                 0
#define NBD_EPERM                   1
#define NBD_EIO                     5
#define NBD_ENOMEM                  12
#define NBD_EINVAL                  22
#define NBD_ENOSPC                  28
#define NBD_EOVERFLOW               75
#define NBD_ENOTSUP                 95
#define NBD_ESHUTDOWN               108

/* Request header; for NBD_CMD_WRITE, length bytes of data follow. */
struct nbd_request {
  uint32_t magic;               /* NBD_REQUEST_MAGIC */
  uint16_t flags;               /* NBD_CMD_FLAG_* */
  uint16_t type;                /* NBD_CMD_* */
  uint64_t cookie;              /* opaque, echoed in the reply */
  uint64_t offset;
  uint32_t length;
} NBD_PACKED;

/* Simple reply; for a successful NBD_CMD_READ the data follows. */
struct nbd_simple_reply {
  uint32_t magic;               /* NBD_SIMPLE_REPLY_MAGIC */
  uint32_t error;               /* NBD_E* */
  uint64_t cookie;
} NBD_PACKED;

/* Structured reply chunk header; length bytes of payload follow. */
struct nbd_structured_reply {
  uint32_t magic;               /* NBD_STRUCTURED_REPLY_MAGIC */
  uint16_t flags;               /* NBD_REPLY_FLAG_DONE */
  uint16_t type;                /* NBD_REPLY_TYPE_* */
  uint64_t cookie;
  uint32_t length;              /* payload bytes */
} NBD_PACKED;

/* Payload start of NBD_REPLY_TYPE_OFFSET_DATA; the data follows. */
struct nbd_structured_reply_offset_data {
  uint64_t offset;
} NBD_PACKED;

/* Payload of NBD_REPLY_TYPE_OFFSET_HOLE. */
struct nbd_structured_reply_offset_hole {
  uint64_t offset;
  uint32_t length;              /* nonzero */
} NBD_PACKED;

/* One descriptor of NBD_REPLY_TYPE_BLOCK_STATUS, whose payload is a 32-bit
 * metadata context id followed by one or more of these.
 */
struct nbd_block_descriptor {
  uint32_t length;              /* nonzero */
  uint32_t status_flags;        /* meaning set by the context */
} NBD_PACKED;

/* Payload start of NBD_REPLY_TYPE_ERROR; the message follows. */
struct nbd_structured_reply_error {
  uint32_t error;               /* NBD_E*, nonzero */
  uint16_t length;              /* message bytes that follow */
} NBD_PACKED;

_Static_assert (sizeof (struct nbd_greeting) == 18, "greeting");
_Static_assert (sizeof (struct nbd_option) == 16, "option header");
_Static_assert (sizeof (struct nbd_option_reply) == 20, "option reply");
_Static_assert (sizeof (struct nbd_export_name_reply) == 134, "export name reply");
_Static_assert (sizeof (struct nbd_info_export) == 12, "info export");
_Static_assert (sizeof (struct nbd_info_block_size) == 14, "info block size");
_Static_assert (sizeof (struct nbd_request) == 28, "request");
_Static_assert (sizeof (struct nbd_simple_reply) == 16, "simple reply");
_Static_assert (sizeof (struct nbd_structured_reply) == 20, "structured reply");
_Static_assert (sizeof (struct nbd_structured_reply_offset_hole) == 12,
                "offset hole");
_Static_assert (sizeof (struct nbd_block_descriptor) == 8, "block descriptor");

#endif /* QNBD_NBD_PROTOCOL_H */
