/* UTF-8 encoding, decoding and validation, and hex digits: shared by the tokenizer and the
 * Jinja engine. */
#ifndef MOE_COMMON_UTF8_H
#define MOE_COMMON_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* Byte length of the valid sequence at s[0..n), 0 if s does not start one (no overlongs, no
 * surrogates, nothing above U+10FFFF). */
size_t moe_utf8_seq_len(const unsigned char *s, size_t n);
/* Decodes the (valid) sequence at s; *cp = code point, returns its byte length. */
size_t moe_utf8_decode(const char *s, uint32_t *cp);
/* Writes cp (at most U+10FFFF) to out; returns the byte length, 1 to 4. */
size_t moe_utf8_encode(uint32_t cp, char out[4]);
/* Offset of the first invalid byte, or n when all of s[0..n) is valid UTF-8. */
size_t moe_utf8_check(const char *s, size_t n);
/* The value of a hexadecimal digit, -1 for any other character. */
int moe_hex_digit(char c);

#endif
