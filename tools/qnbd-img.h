/* tools/qnbd-img.h: what the files of qnbd-img share.  Each subcommand
 * is a file of its own (create.c, info.c) with one entry point called by
 * main.c; options.c parses what several of them take.
 */
#ifndef QNBD_IMG_H
#define QNBD_IMG_H

#include <stdbool.h>
#include <stdint.h>

/* A subcommand: argv[0] is its name; returns the exit status. */
int cmd_create (int argc, char **argv);
int cmd_info (int argc, char **argv);
int cmd_map (int argc, char **argv);

/* ---- options.c ---- */

/* "512", "64K", "1G", "2T" (powers of 1024; K, M, G, T, P, E, either
 * case; a trailing B allowed).  0, or -EINVAL when s is not such a size.
 */
int parse_size (const char *s, uint64_t *out);
/* on/off, yes/no, true/false.  0 or -EINVAL. */
int parse_bool (const char *s, bool *out);
/* Print "qnbd-img: " and the message to stderr. */
void img_error (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

#endif /* QNBD_IMG_H */
